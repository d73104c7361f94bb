"""Fitting the input gate (chestxray.gate_fit): safetensors output, calibration, the fit-gate command."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.cli import main
from chestxray.gate import GATE_FILE, Gate
from chestxray.gate_fit import NON_CHEST_FILES, Features, extract_features, fit_gate


def test_fit_saves_safetensors_only_and_round_trips(fitted_gate):
    folder, predictor, gate, stats, _ = fitted_gate
    path = folder / GATE_FILE
    assert stats.path == path and path.is_file()
    assert stats.n_train == 40 and stats.n_val == 20 and stats.components == ["thumb", "stats", "embedding"]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length + JSON header, no pickle opcodes
    header = json.loads(raw[8: 8 + n])
    meta = json.loads(header["__metadata__"]["gate"])
    assert meta["fingerprint"] and meta["model"] == "tiny" and meta["n_train"] == 40
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw
    loaded = Gate.load(path)
    assert loaded.threshold == pytest.approx(gate.threshold) and loaded.matches(predictor)
    feats = extract_features([np.linspace(0, 1, 80 * 64, dtype=np.float32).reshape(80, 64)], predictor)
    args = (feats.thumbs, feats.stats, feats.embeddings)
    np.testing.assert_allclose(loaded.scores(*args), gate.scores(*args), rtol=1e-6)


def test_cli_fit_gate_small(fitted_gate, tmp_path, data_dir, capsys):
    folder = fitted_gate[0]
    out = tmp_path / "g.safetensors"
    torch_threads = torch.get_num_threads()
    try:
        assert main(["fit-gate", "--model", str(folder), "--data-root", str(data_dir), "--out", str(out),
                     "--max-train-per-source", "8", "--max-eval-per-source", "3", "--threads", "1",
                     "--no-embedding"]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    text = capsys.readouterr().out
    assert out.is_file() and "false alarm" in text and "catch" in text
    assert list(Gate.load(out).models) == ["thumb", "stats"]
    assert all(Path(f).name in text for f in NON_CHEST_FILES)


def test_cli_fit_gate_bad_model_is_one_line_error(tmp_path, capsys):
    torch_threads = torch.get_num_threads()
    try:
        assert main(["fit-gate", "--model", str(tmp_path / "missing")]) == 2
    finally:
        torch.set_num_threads(torch_threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint folder not found")


def test_heavy_tailed_component_does_not_raise_the_bar_for_the_others():
    """Each component is calibrated on its own: outliers of one (here the embedding, as with some
    real models on unseen films) must not hide a clear outlier of another."""
    rng = np.random.default_rng(0)

    def feats(n, emb_scale=1.0):
        emb = rng.normal(size=(n, 16))
        emb[: n // 20] *= emb_scale  # 5% heavy tail
        return Features(rng.normal(size=(n, 1024)), rng.normal(size=(n, 14)), emb, list(range(n)),
                        np.zeros(n, bool))

    val = feats(300, emb_scale=8.0)
    gate, stats = fit_gate(None, [], [], train_features=feats(300), val_features=val)
    assert stats.components == ["thumb", "stats", "embedding"] and stats.val_false_alarm <= 0.02
    assert gate.offsets["embedding"] > gate.offsets["stats"] + 1.0
    odd = rng.normal(size=(1, 14)) * 3.0  # far outside in the gray statistics only
    z = gate.component_z(rng.normal(size=(1, 1024)), odd, rng.normal(size=(1, 16)))
    val_z = gate.component_z(val.thumbs, val.stats, val.embeddings)
    plain_max = np.quantile(np.max(np.stack(list(val_z.values())), axis=0), 0.99)  # one bar for all components
    assert z["stats"][0] < plain_max  # ... under which this image would pass
    assert gate.combine(z)[0] > gate.threshold

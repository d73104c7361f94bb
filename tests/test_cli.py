"""The command line on real files: CSV layout (the app's columns), bad files skipped with one line, CAM PNGs, privacy."""
from __future__ import annotations

import csv
import io
import logging
import shutil
import subprocess
import sys

import pytest

from chestxray.cli import main
from chestxray.labels import get_label_set
from tests.badfiles import BAD, GOOD, PRIVACY_MARKERS
from tests.conftest import REPO
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", arch="resnet10t", seed=5)


def _read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_predict_folder_recursively_with_a_bad_file(model_dir, data_dir, tmp_path, capsys, bad_corpus):
    folder = tmp_path / "films"
    (folder / "sub").mkdir(parents=True)
    for name in ("00000075_000.png", "00000100_000.png"):
        shutil.copy(data_dir / "nih/images_384" / name, folder / name)
    shutil.copy(data_dir / "dicom/pydicom_RG1_UNCR_chest_CR.dcm", folder / "sub/chest.dcm")
    shutil.copy(bad_corpus["text.png"], folder / "sub/broken.png")
    out = tmp_path / "preds.csv"
    code = main(["predict", "--model", str(model_dir), "--out", str(out), "--cam-dir", str(tmp_path / "cams"),
                 str(folder)])
    err = capsys.readouterr().err
    assert code == 1  # one file failed, the rest were predicted
    rows = _read_csv(out.read_text())
    labels = get_label_set("nih14")
    assert rows[0] == ["path", *labels, "above_threshold", "warning", "error"]  # the app's batch CSV columns
    assert len(rows) == 5  # the unreadable file too: its row says why, so scripts need not parse stderr
    by_path = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    broken = by_path.pop(str(folder / "sub/broken.png"))
    assert broken["error"] and all(broken[k] == "" for k in (*labels, "above_threshold", "warning"))
    for row in by_path.values():
        assert row["error"] == "" and all(0.0 <= float(row[k]) <= 1.0 for k in labels)
        flagged = [k for k in row["above_threshold"].split(";") if k]
        assert set(flagged) == {k for k in labels if float(row[k]) >= 0.5}  # the tiny model's thresholds: 0.5
    assert sum(1 for line in err.splitlines() if line.startswith("skipped") and "broken.png" in line) == 1
    assert "Traceback" not in err and "3 predicted, 1 skipped" in err
    assert len(list((tmp_path / "cams").glob("*.png"))) == 3


def test_predict_to_stdout_and_cam_label(model_dir, data_dir, tmp_path, capsys):
    img = data_dir / "nih/images_384/00000100_000.png"
    assert main(["predict", "--model", str(model_dir), "--cam-dir", str(tmp_path), "--cam-label", "Effusion",
                 str(img)]) == 0
    rows = _read_csv(capsys.readouterr().out)
    assert rows[1][0] == str(img)
    assert (tmp_path / "00000100_000_Effusion.png").is_file()


def test_gate_warning_goes_to_the_csv(model_dir, data_dir, monkeypatch, capsys):
    """The input gate's warnings land in the CSV's warning column (and still on stderr); tests/test_batch.py
    checks that they are ``Predictor.analyze``'s on real non-chest images."""
    from chestxray import batch

    real = batch.gate_verdict
    text = "This does not look like a frontal chest X-ray"
    monkeypatch.setattr(batch, "gate_verdict", lambda *a: (r := real(*a), r.reasons.append(text))[0])
    img = data_dir / "nih/images_384/00000100_000.png"
    assert main(["predict", "--model", str(model_dir), str(img)]) == 0
    captured = capsys.readouterr()
    row = dict(zip(*_read_csv(captured.out)))
    assert row["warning"] == text and row["error"] == "" and f"warning {img}: {text}" in captured.err


@pytest.mark.parametrize("name", BAD)
def test_every_bad_file_gets_one_line_and_nonzero_exit(name, model_dir, bad_corpus, capsys):
    assert main(["predict", "--model", str(model_dir), str(bad_corpus[name])]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0].startswith("skipped") and "Traceback" not in "\n".join(err)
    row = dict(zip(*_read_csv(captured.out)))
    assert row["error"] and row["error"] in err[0]  # the same one line, in the CSV's error column


@pytest.mark.parametrize("name", GOOD)
def test_odd_but_valid_files_are_predicted(name, model_dir, bad_corpus, capsys):
    assert main(["predict", "--model", str(model_dir), str(bad_corpus[name])]) == 0
    assert len(_read_csv(capsys.readouterr().out)) == 2


def test_unknown_model_is_one_line_error(capsys, data_dir):
    assert main(["predict", "--model", "no-such-model", str(data_dir / "nih/images_384/00000100_000.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown model")


def test_patient_data_never_leaves_the_cli(model_dir, bad_corpus, tmp_path, capsys, caplog):
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.DEBUG):
        code = main(["-v", "predict", "--model", str(model_dir), "--out", str(out), "--cam-dir",
                     str(tmp_path / "cams"), "--cam-label", "positive", str(bad_corpus["privacy.dcm"])])
    assert code == 0
    captured = capsys.readouterr()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    texts = [captured.out, captured.err, caplog.text]
    for marker in PRIVACY_MARKERS.values():
        assert all(marker not in t for t in texts)
        assert marker.encode() not in written


@pytest.mark.slow  # a fresh interpreter imports torch and timm
def test_module_entry_point_runs(model_dir, data_dir):
    res = subprocess.run([sys.executable, "-m", "chestxray", "predict", "--model", str(model_dir),
                          str(data_dir / "nih/images_384/00000100_000.png")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("path,Atelectasis,")
    assert res.stdout.splitlines()[0].endswith(",No Finding,above_threshold,warning,error")

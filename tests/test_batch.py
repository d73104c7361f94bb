"""Archive-scale prediction (chestxray/batch.py and `chestxray predict`): decoding in worker processes and the
batched model give what ``Predictor.analyze`` gives one film at a time (probabilities, thresholds, the input
gate's verdict), on real films and bad files; the CSV resumes after a kill; torchrun's shards merge into the
single-process CSV."""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray.batch import CsvAppender, Shard, gate_view, merge_parts, predict_films, read_rows
from chestxray.cli import main
from chestxray.imaging import ImageReadError, read_image
from chestxray.predictor import Predictor
from tests.conftest import REPO

HEADER = ["path", "A", "B", "above_threshold", "warning", "error"]


@pytest.fixture(scope="module")
def films(tmp_path_factory, data_dir, bad_corpus) -> list[Path]:
    """Chest films of every kind in the shared data (8-bit PNG at 384 and 1024 px, JPEG, DICOM), the non-chest
    images the gate flags (photos, CT, MR, ultrasound, a tibia, a strip), odd but valid files and bad ones."""
    strip = tmp_path_factory.mktemp("strip") / "strip.png"
    Image.fromarray((read_image(data_dir / "misc/h0001.png").pixels[:100] * 255).astype(np.uint8)).save(strip)
    return [*sorted((data_dir / "nih/images_384").glob("*.png"))[:4], *sorted((data_dir / "nih/full_res").glob(
        "*.png"))[:2], *sorted((data_dir / "kermany/train/PNEUMONIA").glob("*.jpeg"))[:2],
            data_dir / "dicom/pydicom_RG1_UNCR_chest_CR.dcm", data_dir / "dicom/pydicom_RG1_J2KI_chest_CR_jpeg2000.dcm",
            bad_corpus["text.png"], data_dir / "ood/photo_china.jpg", data_dir / "ood/ct_abdomen_kcr2019.png",
            data_dir / "dicom/pydicom_MR2_UNCR_mr.dcm", data_dir / "dicom/pydicom_US1_UNCR_us.dcm",
            data_dir / "dicom/pydicom_RG3_UNCR_tibia_CR.dcm", strip, bad_corpus["truncated.jpg"],
            bad_corpus["gray16.png"], bad_corpus["multiframe.dcm"], bad_corpus["rgba.png"]]


@pytest.fixture(scope="module")
def gated(fitted_gate) -> Predictor:
    """The tiny checkpoint with its fitted input gate (thumbnail, statistics and embedding components)."""
    predictor = Predictor.load(fitted_gate[0], device="cpu")
    assert predictor.gate is not None and "embedding" in predictor.gate.models
    return predictor


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def assert_same_predictions(rows: list[list[str]], reference: list[list[str]], n_labels: int) -> None:
    """Same paths, flags, warnings and errors; probabilities equal to the printed 5 decimals (+-1 in the last:
    a batched forward pass rounds differently)."""
    assert [r[0] for r in rows] == [r[0] for r in reference]
    for r, ref in zip(rows, reference):
        assert r[n_labels + 1:] == ref[n_labels + 1:], r[0]
        assert (r[1:n_labels + 1] == [""] * n_labels) == (ref[1:n_labels + 1] == [""] * n_labels)
        if ref[1]:
            assert np.allclose(np.float64(r[1:n_labels + 1]), np.float64(ref[1:n_labels + 1]), atol=1.01e-5), r[0]


def test_workers_and_batches_give_what_analyze_gives_one_by_one(gated, films):
    """Probabilities, flags and the gate's verdict (rules, messages, score) of every film, errors of bad files."""
    got = [p for batch in predict_films(gated, films, batch_size=3, workers=2, lanes=2) for p in batch]
    assert [p.path for p in got] == films  # input order
    rules = set()
    for path, p in zip(films, got):
        try:
            ref = gated.analyze(read_image(path))
        except ImageReadError as err:
            assert p.analysis is None and p.error == str(err)
            continue
        a = p.analysis
        assert p.error == "" and np.allclose(a.probs, ref.probs, atol=1e-5), path.name
        assert a.positives() == ref.positives() and a.thresholds == ref.thresholds
        assert a.warnings == ref.warnings and a.gate.rules == ref.gate.rules, path.name
        assert a.gate.components.keys() == ref.gate.components.keys() and np.allclose(
            list(a.gate.components.values()), list(ref.gate.components.values()), atol=1e-4), path.name
        assert np.allclose(a.embedding, ref.embedding, atol=1e-5)
        rules |= set(ref.gate.rules)
    assert {"modality", "body_part", "colour", "shape", "appearance"} <= rules  # every kind of warning was met
    assert sum(p.error != "" for p in got) == 2


def test_an_unforeseen_failure_is_one_films_error(gated, films, monkeypatch):
    """A reader failure other than ImageReadError becomes that film's error (its text is not echoed: it may quote
    the file); the loader goes on with the others."""
    from chestxray import batch

    real = batch.read_image
    monkeypatch.setattr(batch, "read_image", lambda p: real(p) if p != films[1] else 1 / 0)
    got = [p for b in predict_films(gated, films[:3], batch_size=2, workers=0, lanes=2) for p in b]
    assert [p.error for p in got] == ["", "could not be read (ZeroDivisionError)", ""]
    assert got[0].analysis is not None and got[2].analysis is not None


def test_the_gate_reads_the_same_features_from_the_thumbnail(gated, data_dir):
    """A worker sends a 128 x 128 thumbnail instead of the film: the gate's pixel features are identical."""
    from chestxray.gate import pixel_features

    xray = read_image(sorted((data_dir / "nih/full_res").glob("*.png"))[0])
    view = gate_view(xray, xray.pixels)
    assert view.pixels.shape == (128, 128) and view.raw is None and view.format == xray.format
    for full, small in zip(pixel_features(xray.pixels), pixel_features(view.pixels)):
        assert np.array_equal(full, small)


def test_cli_csv_equals_the_one_by_one_csv(gated, films, tmp_path, capsys):
    """`chestxray predict` with workers and batches writes the CSV the one-film-at-a-time path writes."""
    folder = str(gated.ckpt.path)
    assert main(["predict", "--model", folder, "--out", str(tmp_path / "a.csv"), "--workers", "2",
                 "--batch-size", "4", *map(str, films)]) == 1  # the bad files
    err = capsys.readouterr().err
    assert main(["predict", "--model", folder, "--out", str(tmp_path / "b.csv"), "--workers", "0",
                 "--batch-size", "1", *map(str, films)]) == 1
    assert capsys.readouterr().err == err  # the same skipped/warning lines, in the same order
    reference = [["path", *gated.labels, "above_threshold", "warning", "error"]]
    for f in films:  # today's loop, one film at a time
        try:
            a = gated.analyze(read_image(f))
            reference.append([str(f), *(f"{p:.5f}" for p in a.probs), ";".join(a.positives()),
                              "; ".join(a.warnings), ""])
        except ImageReadError as e:
            reference.append([str(f), *([""] * len(gated.labels)), "", "", str(e)])
    for name in ("a.csv", "b.csv"):
        rows = _csv((tmp_path / name).read_text())
        assert rows[0] == reference[0]
        assert_same_predictions(rows[1:], reference[1:], len(gated.labels))
    assert f"{len(films) - 2} predicted, 2 skipped (see the error column)" in err and "Traceback" not in err
    assert err.count("\nwarning ") + err.startswith("warning ") >= 6


def test_resume_after_a_kill_gives_the_full_csv(gated, films, tmp_path, capsys):
    folder, out = str(gated.ckpt.path), tmp_path / "p.csv"
    args = ["predict", "--model", folder, "--out", str(out), "--workers", "1", "--batch-size", "4",
            *map(str, films)]
    main(args)
    full = out.read_bytes()
    lines = full.split(b"\r\n")
    out.write_bytes(b"\r\n".join(lines[:6]) + b"\r\n" + lines[6][:40])  # header, 5 rows, a torn sixth
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    assert "; 5 already in" in capsys.readouterr().err
    assert_same_predictions(_csv(out.read_text())[1:], _csv(full.decode())[1:], len(gated.labels))
    assert main([*args, "--resume"]) == 0  # nothing left to do: every path is in the CSV (errors included)
    assert f"0 predicted, 0 skipped; {len(films)} already in" in capsys.readouterr().err
    assert_same_predictions(_csv(out.read_text())[1:], _csv(full.decode())[1:], len(gated.labels))


def test_resume_refuses_another_models_csv_and_stdout(gated, films, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("path,Tuberculosis,above_threshold,warning,error\r\nx.png,0.1,,,\r\n")
    assert main(["predict", "--model", str(gated.ckpt.path), "--out", str(other), "--resume", str(films[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other columns" in err[0]
    assert main(["predict", "--model", str(gated.ckpt.path), "--resume", str(films[0])]) == 2
    assert capsys.readouterr().err.startswith("error: --resume and torchrun need --out")


def test_bad_options_are_one_line(gated, films, capsys):
    assert main(["predict", "--model", str(gated.ckpt.path), "--batch-size", "0", str(films[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --batch-size and --threads must be >= 1") and "Traceback" not in "\n".join(err)


def test_appender_cuts_a_torn_row_and_keeps_one_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,A,B,above_threshold,warning,error\r\na.png,0.1,0.2,,,\r\nb.png,0.")
    sink = CsvAppender(path, HEADER, resume=True)
    assert sink.done == ["a.png"]
    sink.write([["c.png", "0.3", "0.4", "A", "", ""]])
    sink.close()
    assert read_rows(path, HEADER) == [["a.png", "0.1", "0.2", "", "", ""], ["c.png", "0.3", "0.4", "A", "", ""]]
    path.write_text("path,A,B,above_threshold,warning,error\r\n")  # killed before the first batch
    CsvAppender(path, HEADER, resume=True).close()
    assert path.read_bytes() == b"path,A,B,above_threshold,warning,error\r\n"
    path.write_text("path,A,B,abo")  # killed inside the header
    CsvAppender(path, HEADER, resume=True).close()
    assert path.read_bytes() == b"path,A,B,above_threshold,warning,error\r\n"


def test_merge_follows_the_input_order_and_keeps_earlier_rows(tmp_path):
    out = tmp_path / "m.csv"
    shard = Shard(0, 2)
    parts = shard.parts(out)
    assert parts == [tmp_path / "m.csv.part0of2", tmp_path / "m.csv.part1of2"] and Shard().part(out) == out
    for part, paths in zip(parts, (["a", "c", "a"], ["b", "d"])):
        with open(part, "w", newline="") as f:
            csv.writer(f).writerows([HEADER, *([p, "", "", "", "", ""] for p in paths)])
    order = ["a", "b", "c", "d", "a"]  # a file given twice gets two rows, as in one process
    assert [r[0] for r in Shard(0, 2).take(order)] == ["a", "c", "a"]
    out.write_text("path,A,B,above_threshold,warning,error\r\nz,,,,,\r\n")  # a resumed run's merged rows
    new = merge_parts(out, parts, order, HEADER, keep_existing=True)
    assert [r[0] for r in new] == order and not any(p.exists() for p in parts)
    assert [r[0] for r in read_rows(out, HEADER)] == ["z", *order]


def test_shard_from_torchrun_environment(monkeypatch):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    shard = Shard.from_env()
    assert (shard.rank, shard.world, shard.local_rank, shard.local_world) == (3, 4, 1, 2)
    assert shard.take(list(range(10))) == [3, 7] and shard.cores() >= 1
    assert Shard().cores() == len(os.sched_getaffinity(0))


@pytest.mark.slow  # two fresh interpreters import torch and timm, rendezvous, predict and merge
def test_torchrun_two_processes_give_the_single_process_csv(gated, films, tmp_path):
    folder = str(gated.ckpt.path)
    single, merged = tmp_path / "single.csv", tmp_path / "merged.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHESTXRAY_DATA": str(REPO.parent / "shared/data")}
    common = ["predict", "--model", folder, "--workers", "1", "--batch-size", "3", *map(str, films)]
    res = subprocess.run([sys.executable, "-m", "chestxray", *common, "--out", str(single)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # the bad files
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "chestxray", *common, "--out",
                          str(merged)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # the merged CSV is written, then the bad files' exit code
    assert f"{len(films) - 2} predicted, 2 skipped" in res.stderr and not list(tmp_path.glob("*.part*"))
    assert_same_predictions(_csv(merged.read_text())[1:], _csv(single.read_text())[1:], len(gated.labels))
    assert merged.read_text().splitlines()[0] == single.read_text().splitlines()[0]

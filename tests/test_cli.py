"""The command line on real files: CSV layout, bad files skipped with one line, CAM PNGs, privacy."""
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
    assert rows[0] == ["path", *get_label_set("nih14")]
    assert len(rows) == 4 and all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
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


@pytest.mark.parametrize("name", BAD)
def test_every_bad_file_gets_one_line_and_nonzero_exit(name, model_dir, bad_corpus, capsys):
    assert main(["predict", "--model", str(model_dir), str(bad_corpus[name])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("skipped") and "Traceback" not in "\n".join(err)


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

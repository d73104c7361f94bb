"""The package as a user installs it: one command line, no torch for --help, weights found from any directory.

The slow test builds a real wheel install into a tmp folder (pip, no network, no dependencies: they
are the running interpreter's) and runs it from another directory, outside this checkout.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chestxray import __version__, layout
from chestxray.cli import build_parser, main
from tests.conftest import REPO

HEAVY = ("torch", "timm", "pydicom", "gradio")
EXAMPLE = REPO / "examples" / "00001369_000.png"


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHESTXRAY_") and k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["predict", "--help"], ["fit-gate", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "chestxray", *args], capture_output=True,
                         text=True, cwd=REPO, env=_clean_env(), timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    modules = _imported(res.stderr)
    assert "chestxray.cli" in modules  # the check sees our own imports, so it would see torch's
    assert not {m for m in modules if m.split(".")[0] in HEAVY}, "--help imported a heavy module"


def test_import_package_does_not_import_torch():
    code = "import sys, chestxray; chestxray.__version__; print(sorted(m for m in sys.modules if m in %r))" % (HEAVY,)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_clean_env(),
                         timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


def test_the_service_imports_neither_gradio_nor_torch():
    """Every module of ``chestxray.serve`` (the HTTP API's included) imports without gradio, torch or timm: the
    service is the library's, for any front end, and a page can be built before torch is imported."""
    from chestxray import serve

    names = sorted(f"chestxray.serve.{p.stem}" for p in Path(serve.__file__).parent.glob("*.py")
                   if p.stem != "__init__")
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", "; ".join(f"import {n}" for n in names)],
                         capture_output=True, text=True, cwd=REPO, env=_clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    modules = _imported(res.stderr)
    assert set(names) <= modules and "fastapi" in modules  # the check sees the service's own imports
    assert not {m for m in modules if m.split(".")[0] in ("gradio", "torch", "timm")}, "chestxray.serve imported these"


def test_the_app_page_is_built_without_torch():
    """``python app.py`` serves its page before importing torch and timm (about 5 s of its start-up): the
    page, the model list and the default model's card need neither. The warm-up thread, which imports them
    once the server is up, is held back here so that only the build is seen."""
    code = ("import sys, threading\n"
            "start = threading.Thread.start\n"
            "threading.Thread.start = lambda t: None if t.name == 'warm-up' else start(t)\n"
            "import app\n"
            "assert app.demo.service.available and 'mean AUROC' in app.demo.service.card(app.demo.service.default)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'matplotlib')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**_clean_env(GRADIO_ANALYTICS_ENABLED="False"), "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


def test_lazy_public_names_still_work():
    import chestxray

    assert chestxray.Predictor.__name__ == "Predictor" and callable(chestxray.read_image)
    assert set(chestxray.__all__) <= set(dir(chestxray))
    with pytest.raises(AttributeError):
        chestxray.no_such_name  # noqa: B018


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"chestxray {__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_option_is_explained():
    from chestxray.cv import build_parser as cv_parser
    from chestxray.train_cli import HELP, build_parser as train_parser
    from chestxray.training import TrainConfig

    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"predict", "evaluate", "localize", "train", "cv", "release", "publish", "fit-gate",
                             "recard", "ensemble", "compare"}
    for name, sub in {**commands, "train (flags)": train_parser(), "cv (flags)": cv_parser()}.items():
        assert sub.epilog and "example" in sub.epilog and "chestxray" in sub.epilog, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
    assert all(a.help for a in parser._actions), "top-level options need help text"
    import dataclasses

    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(HELP), "describe new TrainConfig fields in HELP"


def test_train_subcommand_resolves_yaml_and_flags(tmp_path, capsys, monkeypatch):
    """``chestxray train`` hands its flags to chestxray.train_cli; a bad recipe is one line."""
    import chestxray.training as training
    from chestxray.train_cli import resolve_config

    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown training options: epochz"
    seen = []
    monkeypatch.setattr(training, "train", lambda cfg: seen.append(cfg) or tmp_path / "best")
    assert main(["train", "--arch", "resnet18", "--epochs", "2", "--out", str(tmp_path / "run")]) == 0
    assert (seen[0].arch, seen[0].epochs) == ("resnet18", 2)
    assert resolve_config(["--epochs", "2"]).epochs == 2


def test_train_script_is_a_thin_wrapper():
    text = (REPO / "train" / "train.py").read_text()
    assert "sys.path" not in text and "chestxray.train_cli" in text


def test_no_sys_path_hacks_left():
    own = [p for p in (REPO / "chestxray").glob("*.py")] + list((REPO / "train").glob("*.py")) + [
        p for p in (REPO / "benchmarks").glob("*.py") if p.name != "results_table.py"]  # owned elsewhere for now
    assert [p.name for p in own if "sys.path.insert" in p.read_text()] == []


# -- where weights and the model list are found --------------------------------------------------
@pytest.fixture
def places(tmp_path, monkeypatch):
    """A fake checkout and a fake installed package, with the environment variables unset."""
    for var in (layout.WEIGHTS_ENV, layout.MODELS_ENV, layout.DATA_ENV):
        monkeypatch.delenv(var, raising=False)
    checkout, packaged = tmp_path / "checkout", tmp_path / "site" / "chestxray" / "shipped"
    (checkout / "weights").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "chestxray"\n')
    (checkout / "models.yaml").write_text("models: []\n")
    (packaged / "weights").mkdir(parents=True)
    (packaged / "models.yaml").write_text("models: []\n")
    monkeypatch.setattr(layout, "_ABOVE", checkout)
    monkeypatch.setattr(layout, "PACKAGED", packaged)
    return checkout, packaged


def test_weights_and_models_rule(places, tmp_path, monkeypatch):
    checkout, packaged = places
    # 1. a checkout (source tree or editable install) uses its own weights/ and models.yaml
    assert layout.checkout_root() == checkout
    assert layout.weights_dir() == checkout / "weights" and layout.models_file() == checkout / "models.yaml"
    assert layout.default_data_root() == str(tmp_path / "shared" / "data")
    # 2. the environment overrides both
    monkeypatch.setenv(layout.WEIGHTS_ENV, str(tmp_path / "w"))
    monkeypatch.setenv(layout.MODELS_ENV, str(tmp_path / "m.yaml"))
    monkeypatch.setenv(layout.DATA_ENV, str(tmp_path / "d"))
    assert (layout.weights_dir(), layout.models_file()) == (tmp_path / "w", tmp_path / "m.yaml")
    assert layout.default_data_root() == str(tmp_path / "d")
    for var in (layout.WEIGHTS_ENV, layout.MODELS_ENV, layout.DATA_ENV):
        monkeypatch.delenv(var)
    # 3. an installed package (no checkout above it) uses the copies installed with it
    (checkout / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    assert layout.checkout_root() is None
    assert layout.weights_dir() == packaged / "weights" and layout.models_file() == packaged / "models.yaml"
    assert layout.default_data_root() == "../shared/data"
    # 4. nothing anywhere: no model list, and a weights folder to name in the message
    shutil.rmtree(packaged)
    assert layout.models_file() is None and layout.weights_dir() == packaged / "weights"


def test_predict_from_another_directory_uses_the_shipped_default(tmp_path, monkeypatch, capsys):
    """From any working directory: the default model of models.yaml and the CSV the app writes."""
    for var in (layout.WEIGHTS_ENV, layout.MODELS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "film.png")
    assert main(["predict", "--out", "p.csv", "film.png"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    default = yaml.safe_load((REPO / "models.yaml").read_text())["default"]
    labels = __import__("json").loads((REPO / "weights" / default / "config.json").read_text())["label_names"]
    assert list(rows[0]) == ["path", *labels, "above_threshold", "warning", "error"]
    assert rows[0]["path"] == "film.png" and rows[0]["error"] == ""
    flagged = [k for k in rows[0]["above_threshold"].split(";") if k]
    assert set(flagged) <= set(labels)


def test_no_model_installed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(layout.WEIGHTS_ENV, str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no trained model is installed") and "CHESTXRAY_WEIGHTS" in err[0]


# -- a real install, outside the checkout -------------------------------------------------------
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "requirements.txt", "models.yaml",
           "chestxray", "weights")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --target`` of a copy of the checkout (so the checkout gets no build/ folder)."""
    pytest.importorskip("setuptools", minversion="77")  # builds offline: no isolated build environment
    root = tmp_path_factory.mktemp("install")
    src, target = root / "src", root / "site"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.tmp")}
                                        if (REPO / name).is_dir() else {}))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                         env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return target


@pytest.mark.slow  # builds a ~100 MB wheel and imports torch in fresh interpreters
def test_installed_package_predicts_offline_from_any_directory(installed, tmp_path, data_dir):
    env = _clean_env(PYTHONPATH=str(installed), HF_HOME=str(tmp_path / "hf"))  # an empty Hugging Face cache
    run = dict(capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    # what was installed: the code, the model list and every shipped checkpoint of models.yaml
    shipped = installed / "chestxray" / "shipped"
    entries = yaml.safe_load((shipped / "models.yaml").read_text())["models"]
    for e in entries:  # an ensemble's folder has its config and card; its members hold the weights
        folder = shipped / "weights" / e["local"]
        config = __import__("json").loads((folder / "config.json").read_text())
        assert (folder / "model.safetensors").is_file() or config["chestxray"].get("ensemble"), e["name"]
    assert (installed / "chestxray" / "serve" / "rest.py").is_file()  # the app's service is part of the package
    where = subprocess.run([sys.executable, "-c", "import chestxray.layout as l; print(l.weights_dir())"], **run)
    assert where.stdout.strip() == str(shipped / "weights"), where.stderr
    # the console script: version, and help without torch
    script = installed / "bin" / "chestxray"
    version = subprocess.run([sys.executable, str(script), "--version"], **run)
    assert version.returncode == 0 and version.stdout.strip() == f"chestxray {__version__}", version.stderr
    helped = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], **run)
    assert helped.returncode == 0 and "torch" not in _imported(helped.stderr)
    # predict a DICOM on the shipped default model, offline, from a directory outside the checkout
    shutil.copy(data_dir / "dicom/pydicom_RG1_UNCR_chest_CR.dcm", tmp_path / "film.dcm")
    res = subprocess.run([sys.executable, str(script), "predict", "--out", "p.csv", "film.dcm"], **run)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 1 and rows[0]["path"] == "film.dcm" and rows[0]["error"] == ""
    assert 0.0 <= float(rows[0]["Effusion"]) <= 1.0
    # no model anywhere: one line, no traceback
    empty = subprocess.run([sys.executable, str(script), "predict", "film.dcm"], capture_output=True, text=True,
                           cwd=tmp_path, env={**env, "CHESTXRAY_WEIGHTS": str(tmp_path / "none")}, timeout=300)
    lines = empty.stderr.strip().splitlines()
    assert empty.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no trained model"), empty.stderr


def test_console_script_of_this_environment(tmp_path):
    """`.ci/run` installs the checkout (pip install -e .): its `chestxray` script answers from anywhere."""
    script = Path(sys.executable).with_name("chestxray")
    if not script.is_file():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path,
                         env=_clean_env(), timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"chestxray {__version__}", res.stderr

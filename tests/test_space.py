"""The Hugging Face Space: README front matter, the exported tree (LFS rules, CPU torch), the push call.

Nothing here touches the network: the push goes to a recording stand-in for ``HfApi``.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


def _script():
    """scripts/make_space.py, imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_space", REPO / "scripts" / "make_space.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _front_matter() -> dict:
    text = (REPO / "README.md").read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must start with YAML front matter"
    return yaml.safe_load(m.group(1))


def _pins(text: str) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0].strip()) for line in text.splitlines()
            if line.split("#")[0].strip() and not line.lstrip().startswith("-")]
    return {r.name.lower(): r for r in reqs}


def test_readme_front_matter_describes_the_space():
    fm = _front_matter()
    pins = _pins((REPO / "requirements.txt").read_text())
    assert fm["sdk"] == "gradio"
    assert str(fm["sdk_version"]) == str(next(iter(pins["gradio"].specifier)).version)  # the pinned gradio
    assert (REPO / fm["app_file"]).is_file()
    assert isinstance(fm["python_version"], str)  # "3.10" must not be read as the number 3.1
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(fm["python_version"]) >= Version(requires.removeprefix(">="))
    assert fm["license"] == "apache-2.0" and (REPO / "LICENSE").is_file()
    assert 0 < len(fm["short_description"]) <= 60  # the Hub's limit
    hub_refs = [m["hub"] for m in yaml.safe_load((REPO / "models.yaml").read_text())["models"] if m.get("hub")]
    assert fm["models"] == [ref.removeprefix("hf-hub:").split("@")[0] for ref in hub_refs]
    assert fm["datasets"] and all(re.fullmatch(r"[\w.-]+/[\w.-]+", d) for d in fm["datasets"])
    assert fm["tags"] and all(isinstance(t, str) for t in fm["tags"])


def test_space_requirements_take_cpu_torch_with_the_same_pins():
    make_space = _script()
    mine = (REPO / "requirements.txt").read_text()
    space = make_space.space_requirements(mine)
    assert f"--extra-index-url {make_space.CPU_INDEX}" in space.splitlines()
    ours, theirs = _pins(mine), _pins(space)
    assert set(ours) == set(theirs)
    for name, req in ours.items():
        if name in make_space.CPU_PACKAGES:
            (pin,) = theirs[name].specifier
            assert pin.version == next(iter(req.specifier)).version + "+cpu"
            assert req.specifier.contains(Version(pin.version))  # the repository's pin accepts the CPU build
        else:
            assert theirs[name] == req
    # The repository itself keeps installing from PyPI: no CPU index, no local labels.
    assert "--extra-index-url" not in mine and "+cpu" not in mine


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path_factory.mktemp("space") / "space"
    return out, _script().export(out)


def test_exported_space_is_accepted_by_the_hub(exported):
    out, files = exported
    make_space = _script()
    for needed in ("app.py", "README.md", "LICENSE", "models.yaml", "pyproject.toml", "chestxray/__init__.py"):
        assert (out / needed).is_file(), needed
    assert not any(f.startswith(("tests/", ".ci/", "train/", "benchmarks/")) for f in files)
    default = yaml.safe_load((out / "models.yaml").read_text())["default"]
    assert (out / "weights" / default / "model.safetensors").is_file()
    # Every big or binary file is LFS-tracked in the Space (the Hub refuses them otherwise) ...
    rules = [line.split()[0] for line in (out / ".gitattributes").read_text().splitlines()]
    assert all("filter=lfs" in line for line in (out / ".gitattributes").read_text().splitlines())
    for f in files:
        path = out / f
        binary = b"\0" in path.read_bytes()[:8192]
        if binary or path.stat().st_size > make_space.MAX_PLAIN_BYTES:
            assert any(path.relative_to(out).match(r) for r in rules), f"{f} would be refused without LFS"
    # ... and the Space installs CPU torch.
    assert "+cpu" in (out / "requirements.txt").read_text()


def test_this_repository_keeps_its_weights_as_plain_blobs():
    """CI clones without LFS: no LFS rule may apply in this repository itself."""
    attributes = REPO / ".gitattributes"
    assert not attributes.exists() or "filter=lfs" not in attributes.read_text()


def test_push_uploads_the_export_as_a_gradio_space(exported, monkeypatch):
    import huggingface_hub

    out, _ = exported
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))
            return type("Info", (), {"commit_url": "https://huggingface.co/spaces/org/demo/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert _script().push(out, "org/demo", token="hf_fake").endswith("/commit/1")
    create, upload = calls[1], calls[2]
    assert create[1] == "org/demo" and create[2]["repo_type"] == "space" and create[2]["space_sdk"] == "gradio"
    assert upload[1]["repo_type"] == "space" and upload[1]["folder_path"] == str(out)


def test_export_refuses_a_folder_inside_the_checkout():
    with pytest.raises(SystemExit, match="outside the checkout"):
        _script().export(REPO / "space_out")

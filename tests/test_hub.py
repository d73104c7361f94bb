"""Publishing to the Hub, tested offline: huggingface_hub's client factory routes HTTP to a handler."""
from __future__ import annotations

import base64
import json

import httpx2
import huggingface_hub
import pytest
import yaml

from chestxray.checkpoint import CheckpointError
from chestxray.cli import main
from chestxray.hub import publish
from tests.helpers import make_checkpoint


@pytest.fixture
def fake_hub():
    """An in-process Hub: records created repos, preupload queries and committed files."""
    state = {"requests": [], "created": [], "committed": {}}

    def handler(req: httpx2.Request) -> httpx2.Response:
        url = str(req.url)
        state["requests"].append((req.method, url))
        if url.endswith("/api/repos/create"):
            body = json.loads(req.content)  # the repo id, however the client splits it into name and organization
            state["created"].append("/".join(x for x in (body.get("organization"), body["name"]) if x))
            return httpx2.Response(200, json={"url": "https://huggingface.co/org/cxr", "name": "org/cxr"})
        if url.endswith("/api/validate-yaml"):  # the Hub checks a card's front matter before committing
            body = json.loads(req.content)
            state["validated"] = next(yaml.safe_load_all(body["content"]))
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in url:
            files = json.loads(req.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in url:
            for line in req.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    state["committed"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/org/cxr/commit/1234",
                                              "commitOid": "1234" * 10, "success": True})
        return httpx2.Response(404, json={"error": f"unexpected {url}"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield state
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_publish_commits_checkpoint_files_but_never_pickles(tmp_path, fake_hub):
    folder = make_checkpoint(tmp_path / "ck")
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n# card\n")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")  # a stray pickle must not be uploaded
    url = publish(folder, "org/cxr", token="hf_fake")
    assert url.endswith("/commit/1234")
    assert fake_hub["created"] == ["org/cxr"]
    assert set(fake_hub["committed"]) == {"config.json", "model.safetensors", "README.md"}
    assert fake_hub["validated"]["library_name"] == "timm"
    assert fake_hub["committed"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert all("huggingface.co" in u for _, u in fake_hub["requests"])


def test_publish_refuses_a_non_checkpoint(tmp_path, fake_hub):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        publish(tmp_path / "x", "org/cxr", token="hf_fake")
    assert fake_hub["requests"] == []


def test_publish_command(tmp_path, fake_hub, capsys):
    folder = make_checkpoint(tmp_path / "ck")
    assert main(["publish", str(folder), "org/cxr", "--token", "hf_fake"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "commit/1234" in out[0]
    assert out[1] == "pin it in models.yaml: hub: hf-hub:org/cxr@" + "1234" * 10  # the line models.yaml needs


@pytest.mark.slow  # trains, evaluates and releases a model
def test_train_push_to_hub_publishes_the_released_folder(tmp_path, fake_hub, data_dir):
    import pandas as pd

    from chestxray.training import TrainConfig, train

    df = pd.read_csv(data_dir / "nih/images_384/labels.csv").head(40)
    df.to_csv(tmp_path / "labels.csv", index=False)
    cfg = TrainConfig(arch="test_efficientnet", csv=str(tmp_path / "labels.csv"), images=str(data_dir / "nih/images_384"),
                      img_size=64, epochs=1, batch_size=8, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"),
                      eval_boot=20, workers=1, push_to_hub="org/cxr")
    train(cfg)
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "roc.png"} <= set(fake_hub["committed"])

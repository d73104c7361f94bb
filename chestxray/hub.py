"""Model references and the Hugging Face Hub: resolve, download (with a quick offline fallback), publish.

A model reference is one of:
- a shipped name (``resnet18``): a folder under ``weights/``;
- a local folder path (``runs/exp1/best``), optionally prefixed ``local-dir:`` as in timm;
- ``hf-hub:org/name[@revision]``: downloaded into the huggingface_hub cache. When the Hub cannot be
  reached, the cache is used, then the shipped folder whose name matches the repo's name (or the
  one given as ``fallback``), after one log line rather than a minute of retries.

A reference is *pinned* when its revision is a full commit hash (``hf-hub:org/name@<40 hex>``):
``publish`` prints that reference for the commit it made, and ``models.yaml`` only follows pinned
ones (a branch such as ``main`` would silently replace the reviewed weights with the newest upload).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from chestxray.layout import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, weights_dir

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
#: Files a checkpoint repo may hold that we download (never pickles).
CHECKPOINT_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, "gate.safetensors", "README.md", "*.png", "*.json", "*.yaml",
                       "*.csv"]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the Hub endpoint, so an offline machine fails in seconds, not a minute."""
    if _offline():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def split_repo(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` -> (``org/name``, ``rev``)."""
    repo = ref[len(HUB_PREFIX):] if ref.startswith(HUB_PREFIX) else ref
    repo, _, rev = repo.partition("@")
    return repo, rev or None


_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_pinned(ref: str) -> bool:
    """True for ``hf-hub:org/name@<40-hex commit>``: a revision that can never move."""
    _, rev = split_repo(str(ref).strip())
    return bool(rev and _COMMIT.fullmatch(rev))


def pinned_ref(repo_id: str, commit: str) -> str:
    """The reference to write in ``models.yaml`` for a published commit: ``hf-hub:org/name@<commit>``."""
    return f"{HUB_PREFIX}{repo_id}@{commit}"


def download(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Downloads a checkpoint repo into the HF cache (or finds it there when offline) and returns its folder."""
    from huggingface_hub import snapshot_download

    local_only = not hub_reachable()
    path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_PATTERNS,
                             local_files_only=local_only)
    return Path(path)


def resolve(ref: str, fallback: str | None = None) -> Path:
    """Turns a model reference into a local checkpoint folder (see the module docstring).

    Raises:
        CheckpointError: nothing usable was found; the message names what was tried.
    """
    ref = str(ref).strip()
    if ref.startswith(HUB_PREFIX):
        repo, rev = split_repo(ref)
        try:
            return download(repo, rev)
        except Exception as err:  # noqa: BLE001 - every Hub failure leads to the same fallback
            name = fallback or repo.rsplit("/", 1)[-1]
            local = weights_dir() / name
            if (local / CONFIG_FILE).is_file():
                log.warning("Hub repo %s unavailable (%s); using shipped weights/%s", repo, type(err).__name__, name)
                return local
            raise CheckpointError(f"cannot get {repo} from the Hub ({type(err).__name__}) and no shipped "
                                  f"weights/{name}") from None
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    shipped = weights_dir() / ref
    if shipped.is_dir() and os.sep not in ref:
        return shipped
    raise CheckpointError(f"unknown model {ref!r}: not a shipped name, a folder, or hf-hub:org/name")


def publish(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
            commit_message: str = "Upload chest X-ray checkpoint") -> str:
    """Uploads a checkpoint folder (config, safetensors, card, plots) to a Hub model repo.

    Returns:
        The commit URL.
    """
    return upload(folder, repo_id, token=token, private=private, commit_message=commit_message)[0]


def upload(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
           commit_message: str = "Upload chest X-ray checkpoint") -> tuple[str, str | None]:
    """:func:`publish`, returning ``(commit URL, commit hash)``: the hash pins the reference in ``models.yaml``."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    api = HfApi(token=token, library_name="timm")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             allow_patterns=CHECKPOINT_PATTERNS, repo_type="model")
    oid = getattr(info, "oid", None)
    return str(getattr(info, "commit_url", info)), (str(oid) if oid else None)

#!/usr/bin/env python
"""Export this checkout as a Hugging Face Space (Gradio, CPU) and optionally push it.

    python scripts/make_space.py --out /tmp/space                 # export only: inspect, or push with git
    python scripts/make_space.py --out /tmp/space --push org/name  # export, then upload (HF_TOKEN or login)

Why an export rather than pushing this repository: the Hub refuses files over 10 MB and binary
files that are not stored with Git LFS (or Xet), and this repository keeps its weights as ordinary
git blobs (CI clones it without LFS). The export is a fresh tree, without history, of the tracked
files the app needs, plus:

- ``.gitattributes`` tracking the binary files with LFS (weights, plots, examples), for a ``git push``;
  ``--push`` uploads with huggingface_hub, which stores such files with LFS/Xet by itself;
- ``requirements.txt`` for a CPU Space: the same pins as this repository's, with torch and
  torchvision taken from PyTorch's CPU wheel index (``+cpu`` builds), so the Space does not
  download the multi-GB CUDA build.

Only the standard library is needed to export; ``--push`` imports huggingface_hub.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Packages taken from the CPU index: PyPI's Linux wheels of these pull in CUDA.
CPU_PACKAGES = ("torch", "torchvision")
#: Tracked paths a Space does not need (development, training, CI).
LEFT_OUT = (".ci/", "tests/", "benchmarks/", "train/", "scripts/", "requirements-dev.txt", ".gitignore")
#: Stored with Git LFS in the Space: every binary file type this repository tracks.
LFS_PATTERNS = ("*.safetensors", "*.png", "*.jpg", "*.jpeg", "*.dcm", "*.npy", "*.pt", "*.bin")
#: The Hub refuses larger files outside LFS.
MAX_PLAIN_BYTES = 10 * 1024 * 1024


def space_requirements(requirements: str) -> str:
    """The Space's requirements.txt: ``requirements`` with torch/torchvision pinned to their ``+cpu`` builds.

    ``==2.14.1`` matches ``2.14.1+cpu`` (PEP 440 ignores the local label), so the pins stay the ones
    this repository installs; the explicit ``+cpu`` makes pip take the CPU index's wheel.
    """
    out = ["# Written by scripts/make_space.py from the repository's requirements.txt: same pins, torch and",
           "# torchvision from PyTorch's CPU wheel index (a CPU Space must not download the CUDA build).",
           f"--extra-index-url {CPU_INDEX}"]
    for line in requirements.splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;+]+)\s*", line)
        if m and m.group(1).lower() in CPU_PACKAGES:
            line = f"{m.group(1)}=={m.group(2)}+cpu"
        out.append(line)
    return "\n".join(out) + "\n"


def gitattributes() -> str:
    """LFS rules for the Space only (never written into this repository)."""
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)


def tracked_files(repo: Path = REPO) -> list[str]:
    """Paths git tracks in ``repo`` (working-tree contents are exported, so commit first to publish a commit)."""
    res = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True)
    return [p for p in res.stdout.decode().split("\0") if p]


def _lfs(path: str) -> bool:
    return any(Path(path).match(p) for p in LFS_PATTERNS)


def export(out: Path, repo: Path = REPO) -> list[str]:
    """Writes the Space tree into ``out`` (emptied first) and returns its files.

    Raises:
        SystemExit: a file the Hub would refuse (over 10 MB and not LFS-tracked), or ``out`` is inside ``repo``.
    """
    out = out.resolve()
    if out == repo or repo in out.parents:
        raise SystemExit(f"error: --out must be outside the checkout ({repo})")
    files = [p for p in tracked_files(repo) if not p.startswith(LEFT_OUT) and p not in LEFT_OUT and (repo / p).is_file()]
    too_big = [p for p in files if (repo / p).stat().st_size > MAX_PLAIN_BYTES and not _lfs(p)]
    if too_big:
        raise SystemExit(f"error: over 10 MB and not LFS-tracked in the Space: {', '.join(too_big)}")
    if out.exists():
        shutil.rmtree(out)
    for p in files:
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / p, out / p)
    (out / ".gitattributes").write_text(gitattributes())
    (out / "requirements.txt").write_text(space_requirements((repo / "requirements.txt").read_text()))
    return sorted({*files, ".gitattributes", "requirements.txt"})


def push(out: Path, space_id: str, token: str | None = None, private: bool = False) -> str:
    """Creates the Space if needed and uploads the exported tree as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(out),
                             commit_message="Update the Space from the chestxray checkout")
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python scripts/make_space.py --out /tmp/space\n"
                                       "  python scripts/make_space.py --out /tmp/space --push org/chestxray-demo")
    p.add_argument("--out", required=True, help="folder to write the Space into (emptied first; outside the checkout)")
    p.add_argument("--push", metavar="ORG/NAME", help="then upload it to this Space (created if missing)")
    p.add_argument("--token", help="Hub token (default: $HF_TOKEN, else the saved login)")
    p.add_argument("--private", action="store_true", help="create the Space private")
    args = p.parse_args(argv)
    try:
        files = export(Path(args.out))
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        print(f"error: cannot list the checkout's files with git ({err})", file=sys.stderr)
        return 2
    print(f"exported {len(files)} files to {args.out}")
    if args.push:
        print(push(Path(args.out), args.push, token=args.token, private=args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

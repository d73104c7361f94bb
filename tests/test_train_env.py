"""train/env.sh and train/runs.sh: every training script runs under them; env.sh's allocator settings keep freed
tensors mapped, and runs.sh keeps the training checkpoints outside the work tree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_train_step import TUNED

REPO = Path(__file__).resolve().parents[1]

# Three training steps of a small conv net whose activations are 64 MiB (above glibc's largest dynamic mmap
# threshold, 32 MiB), as a batch's are; prints the minor page faults of each step after the first.
PROBE = """
import json, resource, torch
torch.manual_seed(0); torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 1, 3, padding=1))
x = torch.randn(8, 1, 256, 256)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[1:]))
"""


def run_probe(env_sh: bool) -> list[int]:
    prefix = "source train/env.sh && " if env_sh else "unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ " \
                                                      "MALLOC_TOP_PAD_ && "
    out = subprocess.run(["bash", "-c", prefix + f'exec "{sys.executable}" -c "$PROBE"'], cwd=REPO, check=True,
                         capture_output=True, text=True, env={"PROBE": PROBE, "PATH": "/usr/bin:/bin"}).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["train/cv.sh", "train/cv_release.sh", "train/train_all.sh"])
def test_every_training_script_sources_env_sh_before_it_trains(script):
    lines = [line.strip() for line in (REPO / script).read_text().splitlines() if not line.lstrip().startswith("#")]
    commands = ('"$PY" -m chestxray train', '"$PY" -m chestxray cv', '"$PY" train/train.py')
    trains = [i for i, line in enumerate(lines) if any(cmd in line for cmd in commands)]
    assert trains and "source train/env.sh" in lines[:trains[0]], script
    assert "source train/runs.sh" in lines[:trains[0]], script


def source_runs_sh(cwd: Path, runs_home: Path) -> None:
    subprocess.run(["bash", "-c", f'set -euo pipefail; source "{REPO}/train/runs.sh"'], cwd=cwd, check=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "CHESTXRAY_RUNS": str(runs_home)})


def test_runs_sh_links_runs_to_a_folder_outside_the_work_tree(tmp_path):
    tree, home = tmp_path / "checkout", tmp_path / "kept" / "runs"
    tree.mkdir()
    source_runs_sh(tree, home)
    assert (tree / "runs").is_symlink() and (tree / "runs").resolve() == home.resolve() and home.is_dir()
    (home / "cv").mkdir()  # what an earlier session trained is found through the link of a fresh checkout
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    source_runs_sh(fresh, home)
    assert (fresh / "runs" / "cv").is_dir()


def test_runs_sh_keeps_an_existing_runs_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fold0").write_text("x")
    source_runs_sh(tmp_path, tmp_path / "elsewhere")
    assert not (tmp_path / "runs").is_symlink() and (tmp_path / "runs" / "fold0").read_text() == "x"
    assert not (tmp_path / "elsewhere").exists()


def test_env_sh_sets_the_benchmarks_values():
    out = subprocess.run(["bash", "-c", "source train/env.sh && env"], cwd=REPO, check=True, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: env.get(k) for k in TUNED} == TUNED
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "2"


def test_env_sh_keeps_freed_activations_mapped_between_steps():
    default, tuned = run_probe(env_sh=False), run_probe(env_sh=True)
    # glibc's default maps every step's activations afresh: ~150,000 faults a step (64 MiB is 16,384 pages)
    assert min(default) > 50_000, default
    assert max(tuned) < min(default) / 4, (tuned, default)  # here 0 or one 16,384 a step

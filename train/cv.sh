#!/usr/bin/env bash
# Cross-validates a recipe fold by fold, then pools and evaluates (chestxray cv). Each fold runs in a
# fresh process; a killed run resumes where it stopped: run the same line again. Each finished fold's small
# files (no weights) are kept in results/cv/<recipe name>/ (commit them as they land): a later session or
# another machine restores those folds instead of training them again.
# Usage: bash train/cv.sh [recipe]     (default: train/configs/cv/efficientnet_lite0.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source train/env.sh
source train/runs.sh
CFG=${1:-train/configs/cv/efficientnet_lite0.yaml}
FOLDS=$("$PY" -c "import sys; from chestxray.recipes import load_recipe; print(load_recipe(sys.argv[1]).get('folds') or 5)" "$CFG")
RECORD=${CV_RECORD:-results/cv/$(basename "$CFG" .yaml)}
for ((i = 0; i < FOLDS; i++)); do
  "$PY" -m chestxray cv --config "$CFG" --only-fold "$i" --record "$RECORD"
done
"$PY" -m chestxray cv --config "$CFG" --record "$RECORD"

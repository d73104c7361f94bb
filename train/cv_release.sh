#!/usr/bin/env bash
# Issue 21's protocol for one recipe, every step resumable (run the same line again after a kill):
#   1. cross-validate it (train/cv.sh: the folds, then the pooled out-of-fold evaluation, cv.json),
#   2. train its all-data weights (train/configs/all/<name>.yaml: split all, the same fixed schedule),
#   3. release them with the cross-validated figures, thresholds and calibration into weights/<name>.
# Usage: bash train/cv_release.sh efficientnet_lite0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=${1:?usage: bash train/cv_release.sh <recipe name under train/configs/cv and train/configs/all>}
CV=train/configs/cv/$NAME.yaml ALL=train/configs/all/$NAME.yaml
source train/runs.sh
out() { "$PY" -c "import sys; from chestxray.recipes import load_recipe; print(load_recipe(sys.argv[1])['out'])" "$1"; }
bash train/cv.sh "$CV"
source train/env.sh
"$PY" -m chestxray train --config "$ALL" --resume true
"$PY" -m chestxray release "$(out "$ALL")" --cv "$(out "$CV")" --name "$NAME"

#!/usr/bin/env bash
# One prepared GPU check (issue 17), about 5-6 minutes on one GPU: model-only training img/s and peak
# memory of the presets (eager and compiled), the device half of the data path, prediction with D4 TTA,
# and training fed by the real DataLoader with 8 and 16 workers (details: bench/gpu_check.py).
# Writes bench/results/gpu-<date>.json and .md.
#
#   bash bench/gpu_check.sh [--smoke] [--out DIR] [--budget-s S]
#   --smoke   the same code on the CPU with tiny sizes, in about a minute (tests/test_gpu_check.py)
#
# Python: $PY, else the kit's .venv, else python3 (a machine with a preinstalled torch, timm, OpenCV,
# tifffile, pandas, numpy). Packages the kit needs beyond those (segmentation-models-pytorch, imagecodecs,
# pyyaml, tqdm) are installed, when missing, from bench/wheels into bench/.pydeps (no network, nothing
# installed system-wide). Fill bench/wheels beforehand where there is network, for the target's Python:
#   PYVER=3.11 bash bench/gpu_wheels.sh
# and carry bench/wheels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
DEPS=bench/.pydeps
export PYTHONPATH=$DEPS${PYTHONPATH:+:$PYTHONPATH}

missing() {  # pip names of the packages this Python cannot import
    "$PY" - <<'PYEOF'
import importlib.util
need = {"segmentation_models_pytorch": "segmentation-models-pytorch", "imagecodecs": "imagecodecs",
        "yaml": "pyyaml", "tqdm": "tqdm"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
}

MISSING=$(missing)
if [[ -n $MISSING ]]; then
    if [[ ! -d bench/wheels ]]; then
        echo "gpu_check: $PY lacks $MISSING and bench/wheels does not exist (see the top of $0)" >&2
        exit 1
    fi
    echo "gpu_check: installing $MISSING from bench/wheels into $DEPS"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --no-deps --find-links bench/wheels --target "$DEPS" $MISSING
    MISSING=$(missing)
    if [[ -n $MISSING ]]; then
        echo "gpu_check: still missing after installing from bench/wheels: $MISSING" >&2
        exit 1
    fi
fi
exec "$PY" bench/gpu_check.py "$@"

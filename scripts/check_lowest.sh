#!/usr/bin/env bash
# Are requirements.txt's lower bounds true? Builds a fresh venv with the LOWEST version each bound
# allows (uv --resolution lowest-direct: every direct requirement at its floor, their own dependencies
# at the newest compatible release), then runs the fast suite (pytest -m "not slow") in it.
# Not part of `make test`: run it by hand whenever a bound in requirements.txt changes.
# Cost: about 3.5 GB downloaded from PyPI (torch's lowest CUDA build and its nvidia wheels: uv neither
#   looks at local torch files nor obeys pip's /etc/xdg/pip cap), ~1.5 min to install on a fast link,
#   then ~5 min for the fast suite on 2 cores.
# Usage: bash scripts/check_lowest.sh [VENV_DIR]      (default /tmp/flair2-lowest-venv, rebuilt each run)
# Knobs (environment): PYTHON (default python3.11: numpy 1.24 and pandas 2.0 have no wheels for 3.12+),
#   PYTEST_ARGS (default -x).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-/tmp/flair2-lowest-venv}
PYTHON=${PYTHON:-python3.11}
PYTEST_ARGS=${PYTEST_ARGS:--x}

UV=$(command -v uv || true)
if [[ -z $UV ]]; then  # a private uv, outside the checked venv
    [[ -x $VENV.uv/bin/uv ]] || { "$PYTHON" -m venv "$VENV.uv" && "$VENV.uv/bin/pip" install -q uv; }
    UV=$VENV.uv/bin/uv
fi

if [[ -e $VENV ]]; then
    [[ -f $VENV/pyvenv.cfg ]] || { echo "check_lowest: $VENV exists and is not a venv; not touching it" >&2; exit 2; }
    rm -rf "$VENV"
fi
"$UV" venv -q -p "$PYTHON" "$VENV"
"$UV" pip install -q --python "$VENV/bin/python" --resolution lowest-direct -r requirements.txt

echo "check_lowest: lowest versions installed in $VENV:"
"$UV" pip freeze --python "$VENV/bin/python" 2>/dev/null \
    | grep -iE '^(torch|torchvision|segmentation.models.pytorch|timm|albumentations|opencv-python-headless|numpy|pandas|scikit-learn|tifffile|imagecodecs|matplotlib|huggingface.hub|tqdm|pyyaml|rasterio|onnx|onnxruntime|onnxscript|tensorboard|pytest|nbclient|nbformat|nbconvert|ipykernel|ruff)==' \
    | sed 's/^/  /'

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONDONTWRITEBYTECODE=1 \
    "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider $PYTEST_ARGS

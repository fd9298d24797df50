#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a machine without network (only what a preinstalled
# torch/timm/OpenCV/tifffile/pandas environment usually lacks), into bench/wheels (not committed).
#   PYVER=3.11 PLATFORM=manylinux_2_28_x86_64 bash bench/gpu_wheels.sh
# PYVER must be the target machine's Python (imagecodecs is a compiled wheel); ~40 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
PYVER=${PYVER:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
PKGS=${PKGS:-segmentation-models-pytorch imagecodecs pyyaml tqdm}
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version "$PYVER" \
    --platform "$PLATFORM" --platform manylinux2014_x86_64 --platform any -d bench/wheels $PKGS
ls -la bench/wheels

#!/usr/bin/env bash
# make demo: the whole flair2-kit chain on CPU on synthetic data, in under 10 minutes on 2 cores.
#   synth -> index -> folds -> train folds 0 and 1 (configs/demo.yaml) -> predict the test split with
#   D4 TTA and the two-fold ensemble -> submit (validated zip) -> evaluate (official mIoU) -> pictures.
# Usage: bash scripts/demo.sh [DEMO_DIR]        (default data/demo)
# Knobs (environment): DEMO_TRAIN_DOMAINS DEMO_TEST_DOMAINS DEMO_ZONES DEMO_PATCHES (synthetic size),
#   DEMO_K (folds), DEMO_RUNS_DIR (runs), DEMO_PRED (predictions/demo), DEMO_SUBMISSIONS (submissions),
#   DEMO_TRAIN_ARGS / DEMO_PREDICT_ARGS (extra key=value settings), PY (python to use).
# Re-running is safe: the synthetic tree, folds, runs and predictions are rebuilt, and each run's zip
# gets a fresh time-stamped name (make_zip never overwrites).
set -euo pipefail

DEMO=${1:-data/demo}
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
TRAIN_DOMAINS=${DEMO_TRAIN_DOMAINS:-6}
TEST_DOMAINS=${DEMO_TEST_DOMAINS:-2}
ZONES=${DEMO_ZONES:-2}
PATCHES=${DEMO_PATCHES:-2}
K=${DEMO_K:-3}
RUNS_DIR=${DEMO_RUNS_DIR:-runs}
PRED=${DEMO_PRED:-predictions/demo}
SUBMISSIONS=${DEMO_SUBMISSIONS:-submissions}
read -r -a TRAIN_ARGS <<< "${DEMO_TRAIN_ARGS:-}"
read -r -a PREDICT_ARGS <<< "${DEMO_PREDICT_ARGS:-}"
NAME=demo-$(date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

T_START=$EPOCHREALTIME
STEP_TIMES=()
step() {  # step NAME CMD...: run a command, print its wall time
    local name=$1 t0=$EPOCHREALTIME
    shift
    printf '\n==> [%s] %s\n' "$name" "$*"
    "$@"
    local dt
    dt=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    STEP_TIMES+=("$(printf '%-9s %7s s' "$name" "$dt")")
    printf '<== [%s] %s s\n' "$name" "$dt"
}

mkdir -p "$DEMO"
# a previous demo tree is replaced (only if it is one: it holds the synthetic centroids JSON)
if [[ -f $DEMO/raw/flair-2_centroids_sp_to_patch.json ]]; then rm -rf "$DEMO/raw"; fi

step synth "$PY" -m src.synth --out "$DEMO/raw" --train-domains "$TRAIN_DOMAINS" \
    --test-domains "$TEST_DOMAINS" --zones "$ZONES" --patches "$PATCHES" --seed 0
step index "$PY" -m src.index --root "$DEMO/raw" --out "$DEMO"
step folds "$PY" -m src.folds --data "$DEMO" --k "$K" --seed 0 --scheme stratified
for fold in 0 1; do
    step "train$fold" "$PY" -m src.train --config configs/demo.yaml --fold "$fold" --resume 0 \
        data_dir="$DEMO" name=demo runs_dir="$RUNS_DIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
done
step predict "$PY" -m src.predict --runs "$RUNS_DIR/demo/fold0/best.pt" "$RUNS_DIR/demo/fold1/best.pt" \
    --split test --out "$PRED" --tta d4 --overwrite --submit "$NAME" --submit-dir "$SUBMISSIONS" \
    data_dir="$DEMO" batch_size=2 channels_last=true ${PREDICT_ARGS[@]+"${PREDICT_ARGS[@]}"}
ZIP=$SUBMISSIONS/$NAME.zip
step evaluate "$PY" -m src.evaluate --pred "$ZIP" --index "$DEMO/index_test.csv" \
    --json "${PRED}_scores.json" --png "${PRED}_confusion.png"
step pictures "$PY" -m src.show --index "$DEMO/index_test.csv" --pred "$PRED" --out "${PRED}_grid.png" --n 4

MIOU=$("$PY" -c 'import json, sys; print("%.4f" % json.load(open(sys.argv[1]))["miou"])' "${PRED}_scores.json")
TOTAL=$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
printf '\n== demo done in %s s ==\n' "$TOTAL"
printf '  %s\n' "${STEP_TIMES[@]}"
cat <<EOF
  synthetic test set mIoU: $MIOU
  submission zip:   $ZIP
  scores JSON:      ${PRED}_scores.json
  confusion PNG:    ${PRED}_confusion.png
  predictions PNG:  ${PRED}_grid.png
  predictions:      $PRED/   runs: $RUNS_DIR/demo/fold{0,1}/ (metrics.csv, curves.png, best.pt)
EOF

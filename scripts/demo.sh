#!/usr/bin/env bash
# make demo: the whole flair2-kit chain on CPU on synthetic data, sized for a slow 2-core laptop (README,
# "make demo", has the measured times), ending with what Sentinel-2 fusion buys:
#   synth -> index -> folds -> train fold 0 twice with configs/demo.yaml, U-T&T fusion and the same U-Net
#   without S2 (side by side, each on half of the cores) -> predict the test split with each
#   -> submit the fusion model (validated zip, scored by predict --submit: official mIoU, per-domain report)
#   -> evaluate the aerial-only one (the same outputs) -> pictures -> the S2-only classes side by side.
# Usage: bash scripts/demo.sh [DEMO_DIR]        (default data/demo)
# Knobs (environment): DEMO_TRAIN_DOMAINS DEMO_TEST_DOMAINS DEMO_ZONES DEMO_PATCHES (synthetic size),
#   DEMO_K (folds), DEMO_RUNS_DIR (runs), DEMO_PRED (predictions/demo; the aerial-only model's go to
#   <DEMO_PRED>_aerial), DEMO_SUBMISSIONS (submissions), DEMO_TTA (none), DEMO_THREADS (torch threads of
#   each of the two side-by-side jobs; default half the cores), DEMO_TRAIN_ARGS / DEMO_PREDICT_ARGS (extra
#   key=value settings for both models), PY (python to use).
# Re-running is safe: the synthetic tree, folds, runs and predictions are rebuilt, and each run's zip
# gets a fresh time-stamped name (make_zip never overwrites).
set -euo pipefail

DEMO=${1:-data/demo}
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
TRAIN_DOMAINS=${DEMO_TRAIN_DOMAINS:-8}
TEST_DOMAINS=${DEMO_TEST_DOMAINS:-2}
ZONES=${DEMO_ZONES:-2}
PATCHES=${DEMO_PATCHES:-2}
K=${DEMO_K:-4}
RUNS_DIR=${DEMO_RUNS_DIR:-runs}
PRED=${DEMO_PRED:-predictions/demo}
SUBMISSIONS=${DEMO_SUBMISSIONS:-submissions}
TTA=${DEMO_TTA:-none}  # flip (3 views) or d4 (8) triple or octuple the prediction time
CORES=$(nproc 2>/dev/null || echo 2)
# two jobs side by side, each with half of the cores: small CPU models use one core better than two
export OMP_NUM_THREADS=${DEMO_THREADS:-$(( CORES > 1 ? CORES / 2 : 1 ))}
read -r -a TRAIN_ARGS <<< "${DEMO_TRAIN_ARGS:-}"
read -r -a PREDICT_ARGS <<< "${DEMO_PREDICT_ARGS:-}"
NAME=demo-$(date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

T_START=$EPOCHREALTIME
STEP_TIMES=()
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
done_step() {  # done_step NAME T0 [NOTE]: record and print a step's wall time
    local dt
    dt=$(since "$2")
    STEP_TIMES+=("$(printf '%-15s %6s s%s' "$1" "$dt" "${3:-}")")
    printf '<== [%s] %s s\n' "$1" "$dt"
}
step() {  # step NAME CMD...: run a command, print its wall time
    local name=$1 t0=$EPOCHREALTIME
    shift
    printf '\n==> [%s] %s\n' "$name" "$*"
    "$@"
    done_step "$name" "$t0"
}
BG_NAME='' BG_LOG='' BG_PID='' BG_T0=''
background() {  # background NAME LOG CMD...: start a step beside the next one, its output into LOG
    BG_NAME=$1 BG_LOG=$2 BG_T0=$EPOCHREALTIME
    shift 2
    printf '\n==> [%s] (side by side with the next step; log: %s) %s\n' "$BG_NAME" "$BG_LOG" "$*"
    "$@" > "$BG_LOG" 2>&1 &
    BG_PID=$!
}
join_background() {  # wait for the background step: its last lines, or its log's tail and exit 1 on failure
    if ! wait "$BG_PID"; then
        tail -n 30 "$BG_LOG"
        printf '<== [%s] FAILED (log: %s)\n' "$BG_NAME" "$BG_LOG"
        exit 1
    fi
    tail -n 2 "$BG_LOG"
    BG_PID=''
    done_step "$BG_NAME" "$BG_T0" "  (side by side)"
}
trap '[[ -z $BG_PID ]] || kill "$BG_PID" 2>/dev/null' EXIT  # a failed step stops its side-by-side job too

mkdir -p "$DEMO"
# a previous demo tree is replaced (only if it is one: it holds the synthetic centroids JSON), and so are
# its predictions: PRED files of another synthetic set (other knobs) would make the zip invalid
if [[ -f $DEMO/raw/flair-2_centroids_sp_to_patch.json ]]; then rm -rf "$DEMO/raw"; fi
for d in "$PRED" "${PRED}_aerial"; do
    if [[ -d $d ]]; then find "$d" -maxdepth 1 -name 'PRED_*.tif' -delete; fi
done

step synth "$PY" -m src.synth --out "$DEMO/raw" --train-domains "$TRAIN_DOMAINS" \
    --test-domains "$TEST_DOMAINS" --zones "$ZONES" --patches "$PATCHES" --seed 0
step index "$PY" -m src.index --root "$DEMO/raw" --out "$DEMO"
step folds "$PY" -m src.folds --data "$DEMO" --k "$K" --seed 0 --scheme stratified
# the same U-Net, trained the same way, without and with the Sentinel-2 branch, side by side
background train-aerial "$DEMO/train_aerial.log" "$PY" -m src.train --config configs/demo.yaml --fold 0 \
    --resume 0 data_dir="$DEMO" name=demo_aerial runs_dir="$RUNS_DIR" fusion=none use_s2=false \
    ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
step train "$PY" -m src.train --config configs/demo.yaml --fold 0 --resume 0 \
    data_dir="$DEMO" name=demo runs_dir="$RUNS_DIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
join_background
background predict-aerial "$DEMO/predict_aerial.log" "$PY" -m src.predict \
    --runs "$RUNS_DIR/demo_aerial/fold0/best.pt" --split test --out "${PRED}_aerial" --tta "$TTA" --overwrite \
    data_dir="$DEMO" batch_size=2 channels_last=true ${PREDICT_ARGS[@]+"${PREDICT_ARGS[@]}"}
step predict "$PY" -m src.predict --runs "$RUNS_DIR/demo/fold0/best.pt" \
    --split test --out "$PRED" --tta "$TTA" --overwrite --submit "$NAME" --submit-dir "$SUBMISSIONS" \
    data_dir="$DEMO" batch_size=2 channels_last=true ${PREDICT_ARGS[@]+"${PREDICT_ARGS[@]}"}
join_background
ZIP=$SUBMISSIONS/$NAME.zip  # scored by predict --submit: ${PRED}_scores.json, _confusion.png, _domains.*
step evaluate-aerial "$PY" -m src.evaluate --pred "${PRED}_aerial" --index "$DEMO/index_test.csv" \
    --json "${PRED}_aerial_scores.json"
step pictures "$PY" -m src.show --index "$DEMO/index_test.csv" --pred "$PRED" --out "${PRED}_grid.png" --n 4

# what S2 adds: herbaceous vegetation and agricultural land are identical in the aerial bands of the synthetic
# set and differ only in their S2 phenology (src/prep/synth_write.py, src/prep/synth_scene.py)
COMPARE=$("$PY" - "${PRED}_scores.json" "${PRED}_aerial_scores.json" <<'EOF'
import json, sys
from src.core.flair import CLASS_NAMES
fusion, aerial = (json.load(open(p)) for p in sys.argv[1:])
fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"
print(f"  {'test-set IoU, S2-only classes':<32} {'fusion':>6} {'aerial':>6}")
for k in (9, 10):
    print(f"  {k:>2} {CLASS_NAMES[k]:<29} {fmt(fusion['ious'][k])} {fmt(aerial['ious'][k])}")
print(f"  {'mIoU (classes 0..11)':<32} {fmt(fusion['miou'])} {fmt(aerial['miou'])}")
EOF
)
ORTHO=$(find "$DEMO/raw" -path '*test*' -name 'IMG_*.tif' | sort | head -n 1)  # any GeoTIFF would do
TOTAL=$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
printf '\n== demo done in %s s (%s torch threads per job, %s cores) ==\n' "$TOTAL" "$OMP_NUM_THREADS" "$CORES"
printf '  %s\n' "${STEP_TIMES[@]}"
cat <<EOF

Sentinel-2 fusion (U-T&T) vs the same U-Net on the aerial bands only, both trained on fold 0:
$COMPARE

  submission zip:   $ZIP
  scores JSON:      ${PRED}_scores.json   (aerial-only: ${PRED}_aerial_scores.json)
  per-domain:       ${PRED}_domains.csv, ${PRED}_domains.png
  confusion PNG:    ${PRED}_confusion.png
  predictions PNG:  ${PRED}_grid.png
  runs:             $RUNS_DIR/demo/fold0/, $RUNS_DIR/demo_aerial/fold0/ (metrics.csv, curves.png, domains.csv,
                    best.pt, TensorBoard events: make tensorboard TB_DIR=$RUNS_DIR)
  logs of the side-by-side steps: $DEMO/train_aerial.log, $DEMO/predict_aerial.log

Whole orthophotos take aerial-only models (no Sentinel-2 series there): the aerial one above, e.g. on a test patch:
  make infer RUNS=$RUNS_DIR/demo_aerial/fold0/best.pt SRC=$ORTHO OUT=${PRED}_landcover.tif
EOF

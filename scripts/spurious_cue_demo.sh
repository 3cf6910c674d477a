#!/bin/bash
# The spurious-cue demo: does `detlens compare` flag a detector that learnt a shortcut?
#
# Trains the demo detector (configs/fasterrcnn_synthetic.yaml, every detlens callback on,
# W&B offline) twice on the synthetic scenes, with the same seed and the same objects:
#   clean: training objects without cue (spurious_cue=0);
#   cue:   90% of training objects also carry a small class-specific mark placed off the
#          object (spurious_cue=0.9) -- a shortcut to the class.
# Both runs validate and probe on the SAME validation images, in which objects carry their
# mark with probability PROBE_CUE (default 0.9; the generator draws objects and marks from
# separate streams, so both runs' images are identical bytes). The two focus records then
# compare image by image, and a difference comes from the model, not from the images:
# a model that learnt the shortcut moves its Grad-CAM from the object to the mark.
# Then it writes one report per run and compares the cue-trained candidate with the clean
# baseline. `detlens compare` exits 1 when a threshold is crossed: the expected outcome
# here, so this script reports it instead of failing on it.
#
#   ./scripts/spurious_cue_demo.sh                 # outputs under runs/spurious_cue/
#   OUT=/tmp/demo MAX_DRIFT=0.4 MIN_ENERGY_IN_BOX=0.3 ./scripts/spurious_cue_demo.sh
#   SKIP_TRAINING=1 ./scripts/spurious_cue_demo.sh # only compare/report existing runs
#   CONFIG=my.yaml PROBE_CUE=0.5 ...               # another config / share of marked probe objects
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/spurious_cue}
CONFIG=${CONFIG:-configs/fasterrcnn_synthetic.yaml}
MAX_DRIFT=${MAX_DRIFT:-0.5}
MIN_ENERGY_IN_BOX=${MIN_ENERGY_IN_BOX:-0.3}
DETLENS=${DETLENS:-.venv/bin/detlens}
PROBE_CUE=${PROBE_CUE:-0.9}
DATA=${DATA:-data}  # scenes are generated on first use under $DATA/synthetic_{clean,cue}_probe<PROBE_CUE>
mkdir -p "$OUT/clean" "$OUT/cue"

newest_run() {  # the newest offline W&B run folder under $1
  find "$1/wandb" -maxdepth 1 -type d -name 'offline-run-*' | sort | tail -n 1
}

train() {  # name, extra args...
  local name=$1; shift
  local start=$SECONDS
  echo "== training '$name' ($CONFIG $*)"
  "$DETLENS" fit --config "$CONFIG" \
    --trainer.logger.init_args.name="spurious-cue-$name" \
    --trainer.logger.init_args.save_dir="$OUT/$name" \
    --trainer.default_root_dir="$OUT/$name" \
    "$@"
  echo "== '$name' trained in $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}

if [[ -z "${SKIP_TRAINING:-}" ]]; then
  : > "$OUT/timings.txt"
  train clean \
    --data.init_args.spurious_cue=0.0 \
    --data.init_args.spurious_cue_val="$PROBE_CUE" \
    --data.init_args.root="$DATA/synthetic_clean_probe$PROBE_CUE"
  train cue \
    --data.init_args.spurious_cue=0.9 \
    --data.init_args.spurious_cue_val="$PROBE_CUE" \
    --data.init_args.root="$DATA/synthetic_cue_probe$PROBE_CUE"
fi

CLEAN=$(newest_run "$OUT/clean")
CUE=$(newest_run "$OUT/cue")
[[ -n "$CLEAN" && -n "$CUE" ]] || { echo "no offline W&B runs under $OUT/clean and $OUT/cue" >&2; exit 2; }
echo "== baseline (clean): $CLEAN"
echo "== candidate (cue):  $CUE"

"$DETLENS" report "$CLEAN" --out "$OUT/report_clean.html"
"$DETLENS" report "$CUE" --out "$OUT/report_cue.html"

set +e
"$DETLENS" compare "$CLEAN" "$CUE" --out "$OUT/compare.html" \
  --max-drift "$MAX_DRIFT" --min-energy-in-box "$MIN_ENERGY_IN_BOX"
status=$?
set -e
echo "== detlens compare exit code: $status (0 pass, 1 threshold crossed, 2 unreadable input)"
# The control: the clean baseline against itself passes.
"$DETLENS" compare "$CLEAN" "$CLEAN" --out "$OUT/compare_self.html" --max-drift "$MAX_DRIFT" \
  && echo "== control: clean vs clean passes"
echo "== reports: $OUT/compare.html $OUT/report_clean.html $OUT/report_cue.html"
case $status in
  1) echo "== the cue-trained model was flagged" ;;
  0) echo "== the cue-trained model was NOT flagged at these thresholds" ;;
  *) exit "$status" ;;
esac

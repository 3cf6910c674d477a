#!/bin/bash
# The spurious-cue demo: does `detlens compare` flag a detector that learnt a shortcut?
#
# Trains the demo detector (configs/fasterrcnn_synthetic.yaml, every detlens callback on,
# W&B offline) twice on the synthetic scenes:
#   clean: the default scenes (data/synthetic), no cue;
#   cue:   data/synthetic_cue, where 90% of training objects also carry a small
#          class-specific mark placed off the object (spurious_cue=0.9); the validation /
#          probe images carry none (spurious_cue_val=0.0), so they are the same images as
#          the clean run's and the two runs' focus records compare image by image.
# then writes one report per run and compares the cue-trained candidate with the clean
# baseline. `detlens compare` exits 1 when a threshold is crossed: that is the expected
# outcome here, so this script reports it instead of failing on it.
#
#   ./scripts/spurious_cue_demo.sh                 # outputs under runs/spurious_cue/
#   OUT=/tmp/demo MAX_DRIFT=0.4 MIN_ENERGY_IN_BOX=0.3 ./scripts/spurious_cue_demo.sh
#   SKIP_TRAINING=1 ./scripts/spurious_cue_demo.sh # only compare/report existing runs
#   CONFIG=my.yaml CUE_ROOT=/tmp/cue_scenes ...     # another config / cue data folder
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/spurious_cue}
CONFIG=${CONFIG:-configs/fasterrcnn_synthetic.yaml}
MAX_DRIFT=${MAX_DRIFT:-0.5}
MIN_ENERGY_IN_BOX=${MIN_ENERGY_IN_BOX:-0.3}
DETLENS=${DETLENS:-.venv/bin/detlens}
CUE_ROOT=${CUE_ROOT:-data/synthetic_cue}  # the cue run's scenes (generated on first use)
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
  train clean
  train cue \
    --data.init_args.spurious_cue=0.9 \
    --data.init_args.spurious_cue_val=0.0 \
    --data.init_args.root="$CUE_ROOT"
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

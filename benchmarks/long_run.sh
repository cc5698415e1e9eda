#!/usr/bin/env bash
# A long training run in sittings, and its quality-vs-training-time curve (issue 14, part 3).
#   benchmarks/long_run.sh RUN_DIR PRESET HOURS SITTING_MINUTES [OVERRIDES...]   train (or continue) RUN_DIR
#   benchmarks/long_run.sh --curve RUN_DIR                                         score every snapshot on full dev
# Each call of the first form is one sitting: it resumes RUN_DIR if it has a checkpoint, trains for at most
# SITTING_MINUTES of wall time and stops with a resumable checkpoint; the run's schedule spans HOURS of training
# time whatever the sittings. Snapshots of the EMA weights are kept every 30 minutes of training time.
# The curve form writes RUN_DIR/curve.md (minutes, steps, BLEU-4, METEOR, CIDEr) from snapshots/*/dev.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${FLICKR8K:-../shared/data/flickr8k}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$1" = "--curve" ]; then
  run=$2
  for snap in "$run"/snapshots/step-* "$run"/checkpoint; do
    [ -f "$snap/dev.json" ] || [ ! -f "$snap/meta.json" ] || \
      .venv/bin/diffcap evaluate "$snap" --dataset flickr8k --root "$ROOT" --split dev --output "$snap/dev.json" > /dev/null
  done
  .venv/bin/python - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = []
for snap in sorted(run.glob("snapshots/step-*")) + [run / "checkpoint"]:
    if not (snap / "dev.json").exists():
        continue
    meta, m = json.loads((snap / "meta.json").read_text()), json.loads((snap / "dev.json").read_text())["metrics"]
    minutes = meta.get("training_minutes")
    if minutes is None:  # the run's checkpoint: its training time is in the training state
        minutes = round(json.loads((snap / "train_state.json").read_text())["elapsed"] / 60, 1)
    rows.append((minutes, meta["step"], m["BLEU-4"], m["METEOR"], m["CIDEr"]))
lines = ["| training minutes | steps | BLEU-4 | METEOR | CIDEr |", "|---|---|---|---|---|"]
by_step = {row[1]: row for row in rows}  # a snapshot at the last step is the run's checkpoint
lines += [f"| {a:.0f} | {b:,} | {c:.1f} | {d:.1f} | {e:.1f} |" for a, b, c, d, e in sorted(by_step.values())]
(run / "curve.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
  exit 0
fi

run=$1; preset=$2; hours=$3; sitting=$4; shift 4
resume=(); [ -f "$run/checkpoint/meta.json" ] && resume=(--resume)
minutes=$(python3 -c "print(float('$hours') * 60)")
.venv/bin/diffcap train "$preset" "train.max_minutes=$minutes" train.snapshot_minutes=30 train.eval_every=0 "$@" \
  --run-dir "$run" --stop-after "$sitting" "${resume[@]}"

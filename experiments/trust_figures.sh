#!/usr/bin/env bash
# Issue 18/20 figures, on a quiet machine (nothing else running; check `uptime` first):
#  1. a tune beside two CPU-bound processes, then the same plan verified alone once they are gone;
#  2. the same tune on the quiet machine;
#  3. the README's tune (and `verify` of its plan), optionally also with an older checkout's
#     autotiacc (BEFORE=path/to/its/venv/bin/autotiacc) to compare before/after a change;
#  4. wall time against budget for tunes of several sizes (inference and training).
# Usage: bash experiments/trust_figures.sh [OUT_DIR]   (default /tmp/trust-figures); writes OUT_DIR/summary.txt
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
M=${1:-/tmp/trust-figures}; mkdir -p "$M"; LOG=$M/summary.txt
A=${AUTOTIACC:-autotiacc}
note() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
timed() {  # name budget_s command...: the command's wall time, its result lines
  local name=$1 b=$2; shift 2; local t0; t0=$(date +%s.%N)
  "$@" > "$M/$name.out" 2> "$M/$name.err"; local rc=$?
  local t1; t1=$(date +%s.%N)
  note "$name rc=$rc wall=$(python3 -c "print(f'{$t1-$t0:.1f}')")s budget=${b}s :: $(grep -E '^(plan|speed-up|measurement|wall time|measured here):' "$M/$name.out" | tr '\n' ' ' | cut -c1-500)"
}
note "uptime: $(uptime)"
python3 -c "while True: pass" & H1=$!; python3 -c "while True: pass" & H2=$!
sleep 2
timed busy-mlp 90 "$A" tune "$ROOT/tests/models/tiny_mlp.py" --budget 90s --out "$M/busy-mlp" --quiet
kill $H1 $H2; wait $H1 $H2 2>/dev/null; sleep 15
timed busy-mlp-verify 0 "$A" verify "$M/busy-mlp" "$ROOT/tests/models/tiny_mlp.py"
timed quiet-mlp 90 "$A" tune "$ROOT/tests/models/tiny_mlp.py" --budget 90s --out "$M/quiet-mlp" --quiet
cd "$ROOT"
if [ -n "${BEFORE:-}" ]; then
  timed readme-before 120 "$BEFORE" tune examples/convnet.py --budget 2m --batch-size 8 --out "$M/readme-before" --quiet
  timed readme-before-verify 0 "$A" verify "$M/readme-before" examples/convnet.py
fi
timed readme 120 "$A" tune examples/convnet.py --budget 2m --batch-size 8 --out "$M/readme" --quiet
timed readme-verify 0 "$A" verify "$M/readme" examples/convnet.py
timed train-60s 60 "$A" tune examples/train_jpeg.py --mode train --budget 60s --out "$M/train-60s" --quiet
timed transformer-60s 60 "$A" tune examples/transformer.py --budget 60s --out "$M/transformer-60s" --quiet
note "done: $(uptime)"

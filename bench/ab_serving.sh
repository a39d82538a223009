#!/bin/bash
# bench.serving (--quick: batch-1 decode and K=4 Zipf with 8 clients, each beside PEFT in the
# same run) in two trees, alternating which runs first each rep:
#   git worktree add /tmp/base fdd110b; git worktree add /tmp/new <rev>; bash bench/ab_serving.sh
set -u
PY=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
BASE=${BASE:-/tmp/base}
NEW=${NEW:-/tmp/new}
for rep in 1 2 3 4; do
  order="base new"
  [ $((rep % 2)) = 0 ] && order="new base"  # no side always runs first
  for side in $order; do
    dir=$BASE; [ "$side" = new ] && dir=$NEW
    echo "=== rep $rep side $side $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$dir" && "$PY" -m bench.serving --quick --parts decode,zipf --ks 4 2>&1 |
      grep -E "decode: |\"(ours_tokens_per_s|peft_swapping_tokens_per_s|speedup)\"")
  done
done

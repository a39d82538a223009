#!/bin/bash
# Our SFT step in an older tree (BASE, a git worktree: `git worktree add /tmp/base REV`) and in
# this one, interleaved with TRL's best, in one run: one JSON line per child to OUT.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
BASE=${BASE:-/tmp/base}
OUT=${OUT:-/tmp/bench_ab.jsonl}
: > "$OUT"
for rep in 1 2 3 4; do
  order="before after trl"
  [ $((rep % 2)) = 0 ] && order="trl after before"  # alternate: no side always runs first
  for side in $order; do
    case $side in
      before) dir=$BASE; cfg=ours_packed;;
      after) dir=$ROOT; cfg=ours_packed;;
      trl) dir=$ROOT; cfg=trl_packing;;
    esac
    r=$(cd "$dir" && "$PY" -m bench.sft_vs_trl --child $cfg --steps 4 --warmup 1 2>/dev/null | tail -1)
    echo "{\"rep\": $rep, \"side\": \"$side\", \"result\": $r}" | tee -a "$OUT"
  done
done

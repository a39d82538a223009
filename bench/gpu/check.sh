#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): one table of training parity, our SFT step against TRL,
# and our chat engine on the device. At most 8 minutes on one H100/H200-class GPU.
#
#   bench/gpu/check.sh [--device cuda|cpu] [--wheels DIR]   run it (cpu: small sizes, < 10 min)
#   bench/gpu/check.sh --prepare DIR                        (with network) download the wheels
#
# On the GPU machine only the Python already there (torch, transformers, peft, accelerate) and
# the wheels in DIR are used: pip installs from DIR without an index (--no-index).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
device=cuda
wheels=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --prepare)
      "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$2" -r bench/gpu/requirements.txt
      exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -n "$wheels" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$wheels" -r bench/gpu/requirements.txt
fi
mkdir -p bench/results
# No network there: the model registry must not try a hub, and nothing phones home.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
limit=$( [ "$device" = cuda ] && echo 480 || echo 600 )  # the GPU budget is 8 minutes
exec timeout "$limit" "$PYTHON" -m bench.gpu.check --device "$device" \
  --out "bench/results/gpu-check-$device.json"

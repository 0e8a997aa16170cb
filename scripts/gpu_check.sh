#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): NCCL pipeline / FSDP / TP equivalence on the visible GPUs,
# the memory tools on one GPU, bf16 throughput (MFU) of one pipeline stage of GPT blocks, the cost
# of activation checkpointing, and activation / FSDP offload memory. Under 8 minutes on an
# H100/H200 machine; writes bench/results/gpu_check.json.
#
#   scripts/gpu_check.sh                 # on a GPU machine
#   scripts/gpu_check.sh --cpu-dry-run   # anywhere: every part on the CPU, tiny sizes (~1-2 min)
#
# Without CUDA (CI) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON, else this checkout's .venv, else python3 (the GPU machines' torch), else python
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  else PYTHON="$(command -v python3 || command -v python)"; fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch: set PYTHON=/path/to/python with torch" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# hard stop at 8 minutes; the script itself budgets 7 and skips what would not fit
exec timeout --kill-after=10 480 "$PYTHON" bench/gpu_check.py "$@"

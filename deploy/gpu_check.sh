#!/usr/bin/env bash
# Line speed on this machine, per GPU: frames/s of the whole detector, the per-stage split and the ratio to
# the bare SAM encoder (python -m workers.bench.gpu_check, once per GPU with CUDA_VISIBLE_DEVICES set to it).
#   bash deploy/gpu_check.sh [--no-setup] [workers.bench.gpu_check args: --frames N --train N --data DIR]
# Sets up first (deploy/dev.sh setup; with a GPU also onnxruntime-gpu in place of onnxruntime). Without a GPU
# it runs once on the CPU and says so: those are CPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LINEINSPECT_VENV:-$ROOT/.venv}
log() { printf '[gpu_check.sh] %s\n' "$*" >&2; }

setup=1
if [ "${1:-}" = "--no-setup" ]; then setup=0; shift; fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
fi

if [ "$setup" = 1 ]; then
  bash deploy/dev.sh setup
  if [ "$gpus" -gt 0 ] && ! "$VENV/bin/python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    log "$gpus GPU(s): installing onnxruntime-gpu in place of onnxruntime"
    "$VENV/bin/python" -m pip uninstall -q -y onnxruntime || true
    "$VENV/bin/python" -m pip install -q onnxruntime-gpu
  fi
fi

"$VENV/bin/python" - <<'PY' >&2
import onnxruntime as o, torch
print(f"[gpu_check.sh] onnxruntime {o.__version__} providers {o.get_available_providers()}; "
      f"torch {torch.__version__} cuda available {torch.cuda.is_available()}")
PY

if [ "$gpus" -eq 0 ]; then
  log "no GPU found (nvidia-smi absent or lists none): running once on the CPU; these are CPU figures"
  exec env CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" -m workers.bench.gpu_check --label CPU "$@"
fi
log "$gpus GPU(s): one run per GPU"
for i in $(seq 0 $((gpus - 1))); do
  CUDA_VISIBLE_DEVICES=$i "$VENV/bin/python" -m workers.bench.gpu_check --label "GPU$i" "$@"
done

#!/usr/bin/env bash
# One prepared GPU check (one H200, no network, under 8 minutes): ViT-L/16 bf16 ZeRO-2 on the single
# GPU at a large micro batch, every phase in its own process, against the bare DeepSpeed+PEFT loop.
#
# Before (on a machine with network, from the repo root):
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl      # deepspeed ships as an sdist only
# Then on the GPU machine, from the repo root:
#   bash tools/gpu_check.sh [OUT_DIR]                   # writes OUT_DIR/gpu_bench.json and gpu_bench.md
set -euo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/deepspeed-*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -c "import deepspeed, peft, timm, torch; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, \
'peft', peft.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 tools/bench_phases.py --model vit_large_patch16_224 --batch-size "$BATCH" --steps 10 --warmup 3 \
  --ds-config ds_configs/gpu_single_bf16.json --rank 32 --out "$OUT/gpu_bench.json" | tee "$OUT/gpu_bench.md"

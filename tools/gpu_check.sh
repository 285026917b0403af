#!/usr/bin/env bash
# One prepared GPU check (one GPU, no network, under 8 minutes):
#   1. the product (tools/gpu_check.py): `prelora-train` through the deepspeed launcher on 1 GPU, bf16 ZeRO-2,
#      ViT-S/16 at 224 px on an ImageFolder written on the spot, full -> warmup -> lora with short windows,
#      a SIGKILL in warmup and --resume (losses compared with an uninterrupted run), the merged export
#      loaded by timm.create_model(...).load_state_dict and scored;
#   2. the ViT-L/16 bench: every phase in its own process at a large micro batch, against the bare
#      DeepSpeed+PEFT loop;
#   2b. the ViT-L/16 step per phase (tools/profile_phases.py), the merged LoRA layer against PEFT's, rank 64;
#   3. the input paths (tools/bench_data.py --device cuda): images/s of the torch loader per CPU worker and of
#      the device loader (nvJPEG + v2 augmentations on this GPU), with the cores per GPU each needs at the
#      full and lora images/s that step 2 measured: where the loader becomes the limit. DALI rows too when
#      nvidia-dali is importable here (it is not a dependency). The product check through the device loader
#      (training, kill and resume with nvJPEG + v2 on the GPU) is one more command when time allows:
#      python3 tools/gpu_check.py --out "$OUT/product_device" --loader device
#   4. ZeRO-2 against ZeRO-3 (tools/bench_zero.py --gpu): ViT-H/14 in full and lora, each cell its own job on
#      this GPU, the bf16 A100 configs: peak memory and step time, and that stage 3 runs on NCCL. One GPU has
#      one data-parallel rank, so stage 3 partitions nothing here: the per-rank savings need >= 2 GPUs
#      (`--ranks N`); on CPU ranks they are in docs/benchmarks.md.
#   5. an engine per phase (tools/bench_phase_engines.py --gpu): ViT-H/14 switched from a ZeRO-3 `full` to `lora` on
#      ZeRO-3 kept, on ZeRO-2, and on ZeRO-2 with the micro batch doubled; ViT-L/16 with the lora micro batch x1, x2,
#      x4. Last, so a tight budget loses only this.
#
# Before (on a machine with network, from the repo root):
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl      # deepspeed ships as an sdist only
# Then on the GPU machine, from the repo root:
#   bash tools/gpu_check.sh [OUT_DIR]   # OUT_DIR/gpu_check.json and gpu_check.md (product.* and gpu_bench.* too)
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/deepspeed-*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  export PATH=/tmp/site/bin:$PATH
fi
python3 -c "import deepspeed, peft, timm, torch; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, \
'peft', peft.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
# the tools import prelora_ds (and its test harness) as a package: this checkout's copy, without installing it
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 tools/gpu_check.py --out "$OUT/product"
product_rc=$?
python3 tools/bench_phases.py --model vit_large_patch16_224 --batch-size "$BATCH" --steps 10 --warmup 3 \
  --ds-config ds_configs/gpu_single_bf16.json --rank 32 --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.md"
bench_rc=$?
cat "$OUT/gpu_bench.md"
# 2b. where the ViT-L step goes per phase, PEFT's LoRA layer against the merged one (issue 35; docs/benchmarks.md)
for LAYER in merged peft; do
  python3 tools/profile_phases.py --model vit_large_patch16_224 --batch-size 64 --rank 64 --lora-layer "$LAYER" \
    --steps 5 --warmup 3 --ds-config ds_configs/gpu_single_bf16.json --out "$OUT/profile_vit_l_$LAYER.json" \
    > "$OUT/profile_vit_l_$LAYER.md"
  cat "$OUT/profile_vit_l_$LAYER.md"
done
# the full and lora images/s just measured (the issue's A100 estimates when the bench failed)
RATES=$(python3 -c "import json, sys; p = json.load(open(sys.argv[1]))['phases']; \
print(' '.join(str(round(p[k]['images_per_s'])) for k in ('full', 'lora')))" "$OUT/gpu_bench.json" 2>/dev/null || echo "700 2100")
python3 tools/bench_data.py --device cuda --procs 1 --seconds 3 --batch 128 --gpu-images-per-s $RATES \
  --paths "torch, files" "torch, shards 256" "device, files" "device, shards 256" "device read only, files" \
  "dali, files" --out "$OUT/data_bench.json" > "$OUT/data_bench.md"
data_rc=$?
cat "$OUT/data_bench.md"
python3 tools/bench_zero.py --gpu --ranks 1 --model vit_huge_patch14_224 --batch-size 32 --steps 4 \
  --out "$OUT/zero_bench.json" > "$OUT/zero_bench.md"
zero_rc=$?
cat "$OUT/zero_bench.md"
python3 tools/bench_phase_engines.py --gpu --ranks 1 --model vit_huge_patch14_224 --micro 16 --accum 2 \
  --out "$OUT/phase_engines_h.json" > "$OUT/phase_engines.md" &&
python3 tools/bench_phase_engines.py --gpu --ranks 1 --model vit_large_patch16_224 --micro 16 --accum 4 \
  --cells micro_x1 micro_x2 micro_x4 --out "$OUT/phase_engines_l.json" >> "$OUT/phase_engines.md"
engines_rc=$?
cat "$OUT/phase_engines.md"
python3 - "$OUT" "$product_rc" "$bench_rc" "$data_rc" "$zero_rc" "$engines_rc" <<'PY'
import json, sys
from pathlib import Path
out, product_rc, bench_rc, data_rc, zero_rc, engines_rc = Path(sys.argv[1]), *map(int, sys.argv[2:7])
def read(p):
    return json.loads(p.read_text()) if p.exists() else None
merged = {"product_rc": product_rc, "bench_rc": bench_rc, "data_rc": data_rc, "zero_rc": zero_rc,
          "engines_rc": engines_rc, "zero": read(out / "zero_bench.json"),
          "engines": [read(out / "phase_engines_h.json"), read(out / "phase_engines_l.json")],
          "product": read(out / "product" / "product.json"), "bench": read(out / "gpu_bench.json"),
          "data": read(out / "data_bench.json")}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1))
md = ["# GPU check", "", "## The product (tools/gpu_check.py)", ""]
md += [(out / "product" / "product.md").read_text() if (out / "product" / "product.md").exists() else "no result", ""]
md += ["## ViT-L/16 phases (tools/bench_phases.py)", "", (out / "gpu_bench.md").read_text(), ""]
md += ["## Input paths at those rates (tools/bench_data.py)", "",
       (out / "data_bench.md").read_text() if (out / "data_bench.md").exists() else "no result", "",
       "## ViT-H/14 under ZeRO-2 and ZeRO-3 (tools/bench_zero.py)", "",
       (out / "zero_bench.md").read_text() if (out / "zero_bench.md").exists() else "no result", "",
       "## An engine per phase (tools/bench_phase_engines.py)", "",
       (out / "phase_engines.md").read_text() if (out / "phase_engines.md").exists() else "no result"]
(out / "gpu_check.md").write_text("\n".join(md))
PY
exit $(( product_rc || bench_rc || data_rc || zero_rc || engines_rc ))

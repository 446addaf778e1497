#!/usr/bin/env bash
# The GPU plan of bench/run_all.py on one CUDA device, sized for under 7 minutes on one H200 (a 6-minute
# measuring budget: a measurement predicted past it is skipped and shown as an estimate): attn1 in fp16 and
# bf16 at SD 1.5's and SDXL's own shapes (LinFusion vs SDPA / flash, the crossover per width), SD1.5 steps
# at 1024/2048/4096 px and SDXL at 2048/4096 px (time inside and outside attn1, torch.cuda.max_memory_allocated),
# one ladder stage at 8K and 16K (Low-Memory Mode + Tiled UNet + tiled VAE). Variants at a size run
# interleaved after a warm-up at that size, n = 3 (attn1 n = 5), as on the CPU. It adds the "GPU run"
# section to docs/benchmarks.md and docs/benchmarks.json.
#
#   bench/gpu.sh                    # needs a ComfyUI host: COMFYUI_PATH (and COMFYUI_PYTHON) set, or the
#                                   # registry reachable for scripts/comfy_host.py to install one
#   bench/gpu.sh --smoke --device cpu --out /tmp/x    # the same code path on a CPU, tiny sizes
#
# First, ComfyUI 0.33's GPU default (DynamicVRAM) checked pass/fail (bench/dynamic_vram.py: SD 1.5 and SDXL in
# fp16 and bf16, fp16 and fp32 LinFusion files, Apply LinFusion manual and auto, Tiled UNet, one ladder stage;
# docs/dynamic_vram_gpu.md). A failing row does not stop the benchmarks. LINFUSION_SKIP_DYNAMIC_CHECK=1 skips it.
# Then issue #29's attn1 comparison (bench/attn1_fast.py, at most 4 more minutes: the fast path eager and
# compiled, the reference path it replaced and SDPA, C = 640/1280, N = 1K-65K, fp16/bf16, CUDA events, errors
# against fp32; docs/attn1_fast_gpu.md). LINFUSION_SKIP_ATTN1_FAST=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[[ " ${args[*]-} " == *" --device "* ]] || args=(--device cuda "${args[@]}")
if [[ -z "${LINFUSION_SKIP_DYNAMIC_CHECK-}" && " ${args[*]} " != *" --device cpu "* ]]; then
  python3 scripts/comfy_host.py python --host 0.33 bench/dynamic_vram.py --device cuda || true
fi
if [[ -z "${LINFUSION_SKIP_ATTN1_FAST-}" && " ${args[*]} " != *" --device cpu "* ]]; then
  python3 scripts/comfy_host.py python --host 0.33 bench/attn1_fast.py --device cuda || true
fi
exec python3 scripts/comfy_host.py python bench/run_all.py "${args[@]}"

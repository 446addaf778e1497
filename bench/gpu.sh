#!/usr/bin/env bash
# Everything a lent GPU should measure, as one prepared run of at most 5 minutes (the host already set up:
# COMFYUI_PATH and COMFYUI_PYTHON, or scripts/comfy_host.py's hosts carried; the device machine reaches no
# registry). Three parts, each under its own wall-clock cap, so the whole stays under 290 s with start-up:
#  1. ComfyUI 0.33's GPU default (DynamicVRAM) pass/fail (bench/dynamic_vram.py, <= 50 s: SD 1.5 and SDXL in
#     fp16 and bf16, fp16 and fp32 LinFusion files, Apply LinFusion manual and auto, Tiled UNet, one ladder
#     stage; docs/dynamic_vram_gpu.md). LINFUSION_SKIP_DYNAMIC_CHECK=1 skips it.
#  2. Issue #29's attn1 comparison (bench/attn1_fast.py, 75 s of measuring, <= 100 s: the fast path eager and
#     compiled, the reference path it replaced and SDPA, C = 640/1280, N = 1K-65K, fp16/bf16, CUDA events,
#     errors against fp32; docs/attn1_fast_gpu.md). LINFUSION_SKIP_ATTN1_FAST=1 skips it.
#  3. bench/run_all.py's GPU plan (1.8 min of measuring, <= 140 s: attn1 at SD 1.5's and SDXL's shapes, SD 1.5
#     and SDXL steps at 512-4096 px, n = 3 interleaved after a warm-up, time inside and outside attn1, peak
#     memory; a step predicted past the budget is skipped and shown as an estimate). The 8K/16K ladder stage
#     is left out: it does not fit 5 minutes (bench/run_all.py --sections ladder runs it on its own).
# A part that fails or hits its cap does not stop the next one.
#
#   bench/gpu.sh
#   bench/gpu.sh --smoke --device cpu --out /tmp/x    # the same code path on a CPU, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[[ " ${args[*]-} " == *" --device "* ]] || args=(--device cuda "${args[@]}")
if [[ -z "${LINFUSION_SKIP_DYNAMIC_CHECK-}" && " ${args[*]} " != *" --device cpu "* ]]; then
  timeout 50 python3 scripts/comfy_host.py python --host 0.33 bench/dynamic_vram.py --device cuda || true
fi
if [[ -z "${LINFUSION_SKIP_ATTN1_FAST-}" && " ${args[*]} " != *" --device cpu "* ]]; then
  LINFUSION_ATTN1_FAST_BUDGET_S=75 timeout 100 python3 scripts/comfy_host.py python --host 0.33 bench/attn1_fast.py --device cuda || true
fi
exec timeout 140 python3 scripts/comfy_host.py python bench/run_all.py "${args[@]}"

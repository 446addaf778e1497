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
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[[ " ${args[*]-} " == *" --device "* ]] || args=(--device cuda "${args[@]}")
exec python3 scripts/comfy_host.py python bench/run_all.py "${args[@]}"

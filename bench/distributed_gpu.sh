#!/usr/bin/env bash
# The distributed tiled UNet on GPUs: NCCL, one rank per GPU, SD 1.5's real width, fp16, 4K px (512 latent).
# UNRUN: written on a machine without GPUs; the test machine lent to this project has one GPU, and NCCL runs one
# rank per GPU, so this needs a machine with at least 2. Prints the rows; add --out to keep them, which go to the
# `gpu` entry of docs/benchmarks.json (drop --no-write).
#
#   COMFYUI_PATH=/path/to/ComfyUI bench/distributed_gpu.sh          # or through scripts/comfy_host.py python
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
if [ "$GPUS" -lt 2 ]; then echo "needs at least 2 GPUs (found $GPUS)"; exit 2; fi
python3 bench/distributed.py --device cuda --world "$GPUS" --width 320 --dtype float16 --size "${SIZE:-512}" \
    --tile "${TILE:-128}" --park "${PARK:-accelerator}" --n 3 --no-write "$@"

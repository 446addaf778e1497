"""Benchmarks of ComfyUI-LinFusion, run inside the real ComfyUI host; one command, one page:

    python3 scripts/comfy_host.py python bench/run_all.py [--quick]     (bench/gpu.sh on a GPU)

run_all.py    the command: plans (sizes, repeats, budget), sections, benchmarks.json
timing.py     the one place that times and measures peak memory (+ budget, machine, GEMM peak)
models.py     random-weight UNets / VAE / ControlNet and the MODEL variants the nodes' core functions build
attn1.py      one self-attention call per backend, width and dtype
unet_step.py  one sampling step per variant and size (LinFusion vs SDPA, Low-Memory, Tiled UNet)
tiled_vae.py  VAE decode: untiled, ComfyUI's tiled, ours
breakdown.py  where the time goes in the shipped example workflows
ladder_stage.py  one 8K / 16K ladder stage's peak memory (GPU plan)
peers.py      official LinFusion and TiledDiffusion's MultiDiffusion, from checkouts given on the command line
page.py       docs/benchmarks.md and plots, rendered from benchmarks.json only
"""

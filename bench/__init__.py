"""Benchmarks of ComfyUI-LinFusion against ComfyUI's own attention, run inside the real ComfyUI host.

    python3 scripts/comfy_host.py python bench/run_all.py [--quick]

Every number in docs/benchmarks.md comes from one run of that command (see run_all.py).
"""

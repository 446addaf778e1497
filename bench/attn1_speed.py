"""Wall time of one LinFusion attn1 forward (B=2, inference) for the module in this checkout, optionally
next to another copy of linfusion_core (e.g. the previous commit) in the same process, 1 thread.

    python3 scripts/comfy_host.py python bench/attn1_speed.py [--old /path/to/dir/with/linfusion_core_old]
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
if os.environ.get("COMFYUI_PATH"):
    sys.path.append(os.environ["COMFYUI_PATH"])


def build(core_module, dim, heads):
    import torch
    m = core_module.LinFusionAttention(dim, heads, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if name.endswith(".1.weight") else r / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.02 * r)
    return m


def time_call(m, x, repeats):
    import torch
    times = []
    with torch.inference_mode():
        m(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", help="directory holding a package linfusion_core_old to compare against")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops  # noqa: F401  (the module's layers)
    torch.set_num_threads(1)
    new = importlib.import_module("linfusion_core.module")
    variants = [("new", new)]
    if args.old:
        sys.path.insert(0, args.old)
        variants.insert(0, ("old", importlib.import_module("linfusion_core_old.module")))
    for n, c, heads in [(16384, 320, 8), (65536, 320, 8), (16384, 640, 10)]:
        x = torch.randn(2, n, c, generator=torch.Generator().manual_seed(1))
        outs = {}
        row = []
        for name, mod in variants:
            m = build(mod, c, heads)
            row.append(f"{name} {time_call(m, x, args.repeats):.3f} s")
            with torch.inference_mode():
                outs[name] = m(x)
        diff = (outs["new"] - outs["old"]).abs().max().item() if len(outs) == 2 else float("nan")
        print(f"B=2 N={n} C={c}: " + ", ".join(row) + f"  (max |new-old| {diff:.2e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

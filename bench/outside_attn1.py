"""Issue #29 item 5: where a LinFusion step's extra time *outside* attn1 could come from. On the H200 an SDXL step
spent 15-25 ms more outside attn1 with LinFusion than with SDPA at 512-2048 px (docs/benchmarks.md, GPU run).
On a GPU below ~16K tokens the time is set by kernel launches, so this counts them: one whole sampling step
(comfy.sample.sample, 1 Euler step, CFG: what each KSampler step costs) under torch.profiler, with every attn1
call wrapped in a record_function range, and the top-level ops that do work (bench/op_count.compute_ops: on a
GPU, launches) split into inside and outside attn1, per op name, for the SDPA and LinFusion variants of the same
UNet. The counts do not depend on the machine or its load (they depend on the layout, not the width: SDXL's full
depth with narrow channels keeps it quick on a CPU).

    python3 scripts/comfy_host.py python --host 0.33 bench/outside_attn1.py --out docs/outside_attn1.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def attn1_ranges(modules):
    """Forward hooks that put each attn1 call in a profiler range named "attn1" (outermost only)."""
    import torch

    stack = []

    def pre(module, args):
        ctx = torch.autograd.profiler.record_function("attn1")
        ctx.__enter__()
        stack.append(ctx)

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)
    return [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]


def split_ops(events) -> dict:
    """Compute ops (top-level ops that do work) inside attn1 ranges and outside them, by name."""
    from bench.op_count import does_work

    inside, outside = collections.Counter(), collections.Counter()
    for e in events:
        parent = e.cpu_parent
        if parent is None and e.name != "attn1" and does_work(e):
            outside[e.name] += 1
        elif parent is not None and parent.name == "attn1" and parent.cpu_parent is None and does_work(e):
            inside[e.name] += 1
    return {"inside": inside, "outside": outside}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl", choices=("sdxl", "sd15"))
    p.add_argument("--channels", type=int, default=64, help="model_channels (the layout's depth is kept)")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch
    from scratch import scratch_dir

    from bench.run_all import boot
    work = scratch_dir("linfusion-outside-attn1-")
    host = boot("cpu", work)
    import comfyui_version
    from bench import models

    core = host.import_core()
    torch.set_num_threads(1)
    models.QUICK[args.family] = dict(model_channels=args.channels)      # full depth, narrow channels
    base = models.build(args.family, True)
    weights = models.linfusion_weights(core, base, args.family, work / "linfusion")
    rows = {}
    for name in ("sdpa", "linfusion"):
        model = models.variant(core, base, weights, name)
        models.sample(model, args.family, args.px)                       # loading and patching, not counted
        hooks = attn1_ranges(models.attn1_modules(base))
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                models.sample(model, args.family, args.px)
        finally:
            for h in hooks:
                h.remove()
        ops = split_ops(prof.events())
        attn1_calls = sum(1 for e in prof.events() if e.name == "attn1" and e.cpu_parent is None)
        rows[name] = {"attn1_calls": attn1_calls, "inside": sum(ops["inside"].values()),
                      "outside": sum(ops["outside"].values()),
                      "outside_by_op": dict(ops["outside"].most_common()),
                      "inside_by_op": dict(ops["inside"].most_common())}
        print(f"{name}: {attn1_calls} attn1 calls, compute ops inside attn1 {rows[name]['inside']}, "
              f"outside {rows[name]['outside']}", flush=True)
    a, b = collections.Counter(rows["linfusion"]["outside_by_op"]), collections.Counter(rows["sdpa"]["outside_by_op"])
    diff = {k: a[k] - b[k] for k in sorted(set(a) | set(b)) if a[k] != b[k]}
    print("outside attn1, LinFusion minus SDPA, by op:", json.dumps(diff), flush=True)
    out = {"command": " ".join(["python3 scripts/comfy_host.py python --host 0.33 bench/outside_attn1.py"] + (argv or sys.argv[1:])),
           "family": args.family, "model_channels": args.channels, "px": args.px, "batch": "cond + uncond",
           "comfyui": comfyui_version.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "variants": rows, "outside_linfusion_minus_sdpa": diff}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

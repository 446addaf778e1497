"""How many ops one attn1 call dispatches: LinFusionAttention (of this checkout, or of another one given by
--repo, e.g. an older commit) against ComfyUI's CrossAttention on PyTorch SDPA, counted with torch.profiler
(every recorded CPU event of one call, nested ones included; the top-level ops; and the compute ops, those of
them that do work: `compute_ops`), at SDXL's and SD 1.5's shapes, batch 2.

    python3 scripts/comfy_host.py python bench/op_count.py --out docs/op_count.json
    git worktree add /tmp/old <commit> && python3 scripts/comfy_host.py python bench/op_count.py --repo /tmp/old \\
        --out /tmp/old_ops.json

The counts do not depend on the machine's load. Each row also has where one call's self CPU time goes, op by
op (the mean of 10 profiled calls on one thread): a breakdown, not a benchmark (bench/attn1.py times calls).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Ops that do no work of their own: views and metadata, allocations, no-op casts, and composites whose work
# shows as a child op (linear -> addmm, layer_norm -> native_layer_norm, reshape -> clone when it copies).
NO_WORK = {"aten::" + name for name in (
    "alias", "view", "_unsafe_view", "view_as", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "reshape", "_reshape_alias", "unflatten", "flatten", "slice", "select", "narrow", "expand", "split", "chunk",
    "unbind", "detach", "resolve_conj", "resolve_neg", "lift_fresh", "empty", "empty_strided", "empty_like",
    "new_empty", "to", "contiguous", "dropout", "linear", "matmul", "layer_norm")}


def does_work(event) -> bool:
    return event.name not in NO_WORK or any(does_work(child) for child in event.cpu_children)


def compute_ops(events) -> int:
    """Top-level ops of one recorded call that do work (run at least one kernel, on a GPU a launch): an op
    counts when it, or an op it calls, is not in NO_WORK."""
    return sum(1 for e in events if e.cpu_parent is None and does_work(e))
# (layout, C, N): SDXL's two widths at 512 px, SD 1.5's top level at 512 px.
SHAPES = [("sdxl", 1280, 256), ("sdxl", 640, 1024), ("sd15", 320, 4096)]
TIMED_CALLS = 10     # the per-op self CPU times: mean over these calls (one thread; times, unlike counts, vary)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose linfusion_core is counted")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--label", help="what --repo holds (e.g. the commit it was extracted from)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    saved, sys.argv = sys.argv, ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.argv = saved
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(args.repo.resolve()))
    module = importlib.import_module("linfusion_core.attention.module")
    sys.path.insert(0, str(REPO))
    from bench.attn1 import LAYOUTS
    from bench.models import filled
    from bench.timing import OtherWork, load_average, machine

    torch.set_num_threads(1)
    measured_on, others = machine(torch.device("cpu"), args.repo), OtherWork()   # as every bench page records them
    ops = comfy.ops.disable_weight_init
    sdpa = {"optimized_attention_override": lambda _d, *a, **kw: attention.attention_pytorch(*a, **kw)}
    rows = []
    for layout, dim, tokens in SHAPES:
        heads, mid = LAYOUTS[layout](dim)
        lin = filled(lambda: module.LinFusionAttention(dim, heads, mid, operations=ops)).eval()
        soft = filled(lambda: attention.CrossAttention(dim, heads=heads, dim_head=dim // heads, operations=ops))
        x = torch.randn(2, tokens, dim)
        for name, fn in (("linfusion", lambda: lin(x)), ("sdpa", lambda: soft(x, transformer_options=sdpa))):
            with torch.inference_mode():
                fn()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                events = prof.events()
                with profile(activities=[ProfilerActivity.CPU]) as timed:
                    for _ in range(TIMED_CALLS):
                        fn()
            by_op = sorted(((a.key, a.self_cpu_time_total / 1000 / TIMED_CALLS) for a in timed.key_averages()),
                           key=lambda kv: -kv[1])
            rows.append({"layout": layout, "dim": dim, "tokens": tokens, "attention": name, "events": len(events),
                         "top_level": sum(1 for e in events if e.cpu_parent is None),
                         "compute_ops": compute_ops(events),
                         "self_cpu_ms_per_call": round(sum(ms for _, ms in by_op), 3),
                         "top_ops_self_cpu_ms": {k: round(ms, 3) for k, ms in by_op[:8]}})
            print(json.dumps(rows[-1]))
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python3 scripts/comfy_host.py python bench/op_count.py " + " ".join(sys.argv[1:]),
              "repo_commit": args.label or commit or "?", "machine": measured_on,
              "load_end": load_average(), "other_cores": others.cores(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

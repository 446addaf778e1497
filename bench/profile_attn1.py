"""Where one LinFusion attn1 call spends its time: GEMMs vs copies vs element-wise ops (torch profiler).

    python3 scripts/comfy_host.py python bench/profile_attn1.py [--tokens 65536] [--dim 320] [--threads 1]

Prints the op table and the share of the call spent outside matrix multiplies, next to the time the
module's GEMMs alone take at this machine's measured throughput: the gap is what a faster module can win.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    from comfy_harness import get_host
    host = get_host(Path(tempfile.mkdtemp(prefix="linfusion-profile-")))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.linfusion_adapter import build_linfusion_attention, linfusion_attn1_flops
    from bench.machine import gemm_peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    core = importlib.import_module(host.extension_module.__name__ + ".linfusion_core")
    cpu = torch.device("cpu")
    module = build_linfusion_attention(core, args.dim, args.heads, None, cpu, torch.float32)
    if module is None:
        sys.exit("linfusion_core.module.LinFusionAttention is not available in this checkout")
    x = torch.randn(2, args.tokens, args.dim)
    peak = gemm_peak_flops(cpu, quick=True)["peak_flops"]
    with torch.inference_mode():
        module(x)
        t0 = time.perf_counter()
        module(x)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x)
    table = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in table)
    gemm = sum(e.self_cpu_time_total for e in table if e.key in GEMM_OPS)
    flops = linfusion_attn1_flops(2, args.tokens, args.dim, args.heads, args.dim)
    print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=32))
    print(f"N={args.tokens} C={args.dim} batch 2, {torch.get_num_threads()} threads: {wall:.3f} s per call, "
          f"{flops / wall / 1e9:.1f} GFLOP/s = {flops / wall / peak * 100:.0f}% of the GEMM peak "
          f"({peak / 1e9:.1f} GFLOP/s)")
    print(f"GEMM ops {gemm / total * 100:.0f}% of profiled time, everything else {100 - gemm / total * 100:.0f}%; "
          f"the module's FLOPs at the GEMM peak would take {flops / peak:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

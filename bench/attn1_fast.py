"""Issue #29 on a GPU: one attn1 call of the fast path (attention/fast_path.py) against the reference path it
replaced (the same module with fast_path off: the pre-#29 code path) and ComfyUI's CrossAttention on PyTorch
SDPA, SDXL's layout (64-channel heads, LinFusion-XL's C/16 MLPs) at C = 640 and 1280, batch 2, N = 1K to 65K
tokens, fp16 and bf16; the fast path also under torch.compile (inductor, dynamic shapes: one compile per width
and dtype). Each size: one warm-up call per variant, then n calls interleaved (A B C D, D C B A, ...), each timed
with CUDA events; median, min and max in ms. Errors: max |out - fp32| / max |fp32| of each LinFusion variant
against the fp32 reference path of the same weights (TF32 off), and compiled against eager.

    python3 scripts/comfy_host.py python bench/attn1_fast.py --device cuda      # bench/gpu.sh runs it
    python3 scripts/comfy_host.py python bench/attn1_fast.py --device cpu --smoke --out /tmp/x   # the code path
    python3 scripts/comfy_host.py python bench/attn1_fast.py --plan             # the table, every row unmeasured

Writes docs/attn1_fast_gpu.json and the table in docs/attn1_fast_gpu.md; `--plan` writes the table with every
row unmeasured (no device lent), so the page always says what has not run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

WIDTHS = (640, 1280)
DTYPES = ("float16", "bfloat16")
TOKENS = (1024, 4096, 16384, 65536)
VARIANTS = ("fast", "fast+compile", "reference", "sdpa")
BATCH = 2
N_CALLS = 7
SMOKE = dict(widths=(64,), tokens=(64, 256), n=2)
# Measuring stops (rows left unmeasured, with the reason) past this; bench/gpu.sh gives it its share of 5 minutes.
BUDGET_S = float(os.environ.get("LINFUSION_ATTN1_FAST_BUDGET_S", 240))


def planned(widths=WIDTHS, dtypes=DTYPES, tokens=TOKENS) -> list[dict]:
    return [{"dim": c, "heads": c // 64 or 1, "mid_dim": c // 16, "dtype": d, "tokens": n, "variant": v,
             "result": "unmeasured"} for c in widths for d in dtypes for n in tokens for v in VARIANTS]


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn1_fast_gpu.json").write_text(json.dumps(doc, indent=1))
    meta = doc.get("meta", {})
    lines = ["# attn1 on a GPU: the fast path, the reference path and SDPA (issue #29)", "",
             "Written by `bench/attn1_fast.py` (see its docstring). `unmeasured` rows have not run on a GPU: no",
             "device has been lent since the fast path was written, so every GPU number here is still to come.", "",
             f"- device: {meta.get('device', 'none lent')}; torch {meta.get('torch', '-')}; run: {meta.get('run', '-')}",
             "", "| C | dtype | tokens | variant | median ms | min-max ms | rel. error vs fp32 | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        timed = "median_ms" in r
        lines.append(f"| {r['dim']} | {r['dtype']} | {r['tokens']} | {r['variant']} | "
                     + (f"{r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f}" if timed else f"{r['result']} | ")
                     + f" | {'' if r.get('rel_err') is None else format(r['rel_err'], '.1e')} | {r.get('note', '')} |")
    (out / "attn1_fast_gpu.md").write_text("\n".join(lines) + "\n")


def boot_comfy(device: str) -> None:
    import os

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    saved, sys.argv = sys.argv, ["main.py"] + (["--cpu"] if device == "cpu" else [])
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.argv = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the code path, e.g. on a CPU)")
    p.add_argument("--plan", action="store_true", help="write the table with every row unmeasured, measure nothing")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    args = p.parse_args(argv)
    widths, tokens, n_calls = (SMOKE["widths"], SMOKE["tokens"], SMOKE["n"]) if args.smoke else (WIDTHS, TOKENS, N_CALLS)
    if args.plan:
        write({"meta": {}, "rows": planned(widths, DTYPES, tokens)}, args.out)
        return 0
    boot_comfy(args.device)
    import torch

    rows = measure(torch.device(args.device), widths, tokens, n_calls)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
            "run": time.strftime("%Y-%m-%d %H:%M"), "batch": BATCH, "n": n_calls}
    write({"meta": meta, "rows": rows}, args.out)
    print(f"written: {args.out / 'attn1_fast_gpu.md'}")
    return 0


def measure(device, widths, tokens, n_calls) -> list[dict]:
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import torch

    import linfusion_core.attention.module as lf_module
    from bench.models import filled

    started = time.perf_counter()
    sdpa = {"optimized_attention_override": lambda _f, *a, **kw: attention.attention_pytorch(*a, **kw)}
    rows = []
    for dim in widths:
        heads, mid = max(dim // 64, 1), dim // 16
        fp32 = filled(lambda: lf_module.LinFusionAttention(dim, heads, mid)).to(device).eval().requires_grad_(False)
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            lin = filled(lambda: lf_module.LinFusionAttention(dim, heads, mid)).to(device, dtype).eval()
            lin.requires_grad_(False)
            soft = filled(lambda: attention.CrossAttention(dim, heads=heads, dim_head=dim // heads, dtype=dtype,
                                                           operations=comfy.ops.disable_weight_init)).to(device, dtype)
            compiled = torch.compile(lin, dynamic=True)
            for n in tokens:
                base = {"dim": dim, "heads": heads, "mid_dim": mid, "dtype": dtype_name, "tokens": n}
                if time.perf_counter() - started > BUDGET_S:
                    rows += [dict(base, variant=v, result="unmeasured", note="over the time budget") for v in VARIANTS]
                    continue
                x = torch.randn(BATCH, n, dim, device=device, dtype=dtype)

                def reference():
                    lin.fast_path = False
                    try:
                        return lin(x)
                    finally:
                        lin.fast_path = True
                calls = {"fast": lambda: lin(x), "fast+compile": lambda: compiled(x), "reference": reference,
                         "sdpa": lambda: soft(x, transformer_options=sdpa)}
                with torch.inference_mode():
                    prev = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = False
                    try:
                        fp32.fast_path = False
                        exact = fp32(x.float())
                        fp32.fast_path = True
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = prev
                    outs, notes = {}, {}
                    for name, fn in list(calls.items()):     # warm-up (and the compile) at this size
                        t0 = time.perf_counter()
                        try:
                            outs[name] = fn()
                        except Exception as error:            # noqa: BLE001  (a row says what failed)
                            notes[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                            del calls[name]
                            continue
                        if name == "fast+compile":
                            notes[name] = f"first call {time.perf_counter() - t0:.1f} s"
                    times = {name: [] for name in calls}
                    for r in range(n_calls):
                        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                            times[name].append(timed(calls[name], device))
                scale = exact.float().abs().max().item()
                for name in VARIANTS:
                    row = dict(base, variant=name, note=notes.get(name, ""))
                    if name not in times:
                        rows.append(dict(row, result="failed"))
                        continue
                    t = times[name]
                    row.update(result="measured", median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t))
                    if name != "sdpa":
                        row["rel_err"] = (outs[name].float() - exact.float()).abs().max().item() / scale
                    if name == "fast+compile":
                        row["rel_err_vs_eager"] = ((outs[name].float() - outs["fast"].float()).abs().max().item()
                                                   / max(outs["fast"].float().abs().max().item(), 1e-30))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del x, outs, exact
    return rows


def timed(fn, device) -> float:
    """One call's time in ms: CUDA events on a GPU, the wall clock elsewhere."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


if __name__ == "__main__":
    sys.exit(main())

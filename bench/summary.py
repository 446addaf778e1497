"""Derived numbers of one run: estimates for skipped sizes, fitted exponents, headline and targets."""
from __future__ import annotations

from pathlib import Path

from . import report
from .unet_bench import estimate_from_attn1, fit_exponent
from .unet_models import attn1_levels

NOTES = {
    "attn1": ("ComfyUI's CrossAttention (to_q/k/v/out + the backend, chosen per call through "
              "`transformer_options['optimized_attention_override']`) against `LinFusionAttention` "
              "(its own to_q/k/v/out and the two C -> C -> C query/key MLPs of LinFusion-1-5, so it does "
              "about twice the projection FLOPs). FLOP counts: softmax 8NC^2 + 4N^2C, LinFusion 16NC^2 + "
              "4NCd (per batch item). % GEMM = achieved FLOP/s over the measured GEMM peak (the best of the "
              "GEMM measurements taken before each width; on a loaded machine the throughput drifts, and a "
              "value above 100% means the call ran while the machine was quieter than during the GEMM runs). Peak MiB = "
              "growth of the process's resident set during the call (VmHWM) beyond its inputs. A backend "
              "is skipped past the size where its time, extrapolated from its last measurement (N^2 for "
              "softmax), exceeds the per-call limit; `sub_quad` is ComfyUI's default on the CPU."),
    "unet": ("One Euler step at CFG 7.5 through `comfy.sample.sample` on ComfyUI's own UNetModel built "
             "from the SD1.5 config ComfyUI detects for real checkpoints, random weights (std "
             "1/sqrt(fan_in)). `linfusion` = the MODEL after the extension's Load/Apply LinFusion nodes "
             "(random LinFusion-1-5-shaped weights), attn2 on SDPA; `sdpa` = ComfyUI with PyTorch SDPA; "
             "`default` = ComfyUI's default CPU attention (sub-quadratic), only at the smallest size; "
             "`no_attn1` = attn1 output zeroed (smallest size only), the floor for any attn1. Softmax sizes past the step "
             "limit are skipped; their `est.` is the measured LinFusion step with each of its attn1 "
             "calls swapped for the measured (or N^2-extrapolated) SDPA attn1 time of section 1."),
    "model": ("Step time = the attn1-free step (`no_attn1`) measured at the smallest size, scaled by pixel "
              "count, plus each attn1 call of that size from section 1 (measured, or extrapolated as N^2 "
              "for SDPA where it was skipped). Where a size was also measured, the two columns side by "
              "side show how far the model can be trusted."),
    "sdxl": ("SDXL at 2.6 B fp32 parameters needs ~10 GiB for its weights alone and a step costs minutes on "
             "a small CPU: the rows below say which sizes ran and why others did not. At 1024 px its "
             "self-attention sees at most 4096 tokens (C = 640), so the gap to SDPA is small there; it grows "
             "as in section 1 beyond."),
    "sampling": ("`comfy.sample.sample` (the function ComfyUI's KSampler node calls): Euler, normal "
                 "schedule, CFG 7.5, from noise, one run each (the model is already loaded)."),
    "method": ("Times are wall-clock medians (`time.perf_counter`; CUDA events on a GPU). A warm-up call "
               "precedes small measurements. CPU memory: Linux VmHWM after resetting it through "
               "/proc/self/clear_refs, minus VmRSS before the call, after malloc_trim; GPU: "
               "torch.cuda.max_memory_allocated minus the allocation before the call."),
}


MODEL_SIZES = (1024, 2048, 4096)


def attn1_free_step(res: dict, family: str, pixels: int) -> float | None:
    """The measured attn1-free step (`no_attn1`) at its smallest size, scaled with the pixel count
    (convolutions, FFNs, cross-attention and norms are all linear in it)."""
    floor = [r for r in res["steps"] if r["family"] == family and r["variant"] == "no_attn1" and "median_s" in r]
    if not floor:
        return None
    base = min(floor, key=lambda r: r["pixels"])
    return base["median_s"] * (pixels / base["pixels"]) ** 2


def component_model(res: dict, family: str, pixels: int, variant: str) -> float | None:
    """Step time from parts: the attn1-free step at this size plus every attn1 call at this size timed (or
    N^2-extrapolated) in section 1. Checked against the measured sizes."""
    total = attn1_free_step(res, family, pixels)
    if total is None:
        return None
    for tokens, dim, count in attn1_levels(family, pixels):
        r = _row(res["attn1"], dim=dim, tokens=tokens, backend=variant)
        t = r and (r.get("median_s") or r.get("predicted_s"))
        if not t:
            return None
        total += count * t
    return total


def _row(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def finish(res: dict) -> None:
    steps, attn = res["steps"], res["attn1"]
    gemm = res["gemm"]
    gemm["peak_flops"] = max(gemm.get("samples") or [gemm["peak_flops"]])
    for r in attn:
        if "median_s" in r:
            r["flop_fraction"] = r["flops"] / r["median_s"] / gemm["peak_flops"]
    for r in steps:
        if r["family"] == "sd15" and r["variant"] == "sdpa" and "skipped" in r:
            est = estimate_from_attn1(steps, attn, "sd15", r["pixels"], attn1_levels("sd15", r["pixels"]))
            if est is not None:
                r["estimated_s"] = est
    for variant in ("linfusion", "sdpa", "no_attn1"):
        res["exponents"][variant] = fit_exponent([r for r in steps if r["family"] == "sd15"], variant)
    res["component_model"] = []
    for px in MODEL_SIZES:
        row = {"pixels": px}
        for variant in ("linfusion", "sdpa"):
            row[variant] = component_model(res, "sd15", px, variant)
            measured = _row(steps, family="sd15", pixels=px, variant=variant)
            row[variant + "_measured"] = measured.get("median_s") if measured else None
        res["component_model"].append(row)
    res["notes"] = NOTES
    res["headline"], res["targets"] = headline(res)


def _speedup(ours, base):
    if ours and base and "median_s" in ours:
        b = base.get("median_s") or base.get("estimated_s")
        if b:
            return b / ours["median_s"], "median_s" not in base
    return None, False


def headline(res):
    attn, steps = res["attn1"], res["steps"]
    lines, targets = [], []
    lin = _row(attn, dim=320, tokens=16384, backend="linfusion")
    for backend in ("sdpa", "sub_quad"):
        s, _ = _speedup(lin, _row(attn, dim=320, tokens=16384, backend=backend))
        if s:
            lines.append(f"attn1 at N = 16384 (1024 px), C = 320: LinFusion {lin['median_s']:.3f} s, "
                         f"{_faster(s)} ComfyUI's {backend}.")
    s, _ = _speedup(lin, _row(attn, dim=320, tokens=16384, backend="sdpa"))
    targets.append({"target": "attn1 N=16384, C=320: >= 10x faster than SDPA",
                    "measured": f"{s:.1f}x" if s else "not measured", "met": _met(s, 10)})
    big = [r for r in attn if r["backend"] == "linfusion" and r["tokens"] >= 65536 and "flop_fraction" in r]
    if big:
        worst = min(r["flop_fraction"] for r in big)
        targets.append({"target": ">= 60% of GEMM throughput at N >= 65536",
                        "measured": ", ".join(f"C={r['dim']} N={r['tokens']}: {r['flop_fraction'] * 100:.0f}%"
                                              for r in big), "met": _met(worst, 0.6)})
    else:
        targets.append({"target": ">= 60% of GEMM throughput at N >= 65536", "measured": "not measured",
                        "met": "-"})
    sd = [r for r in steps if r["family"] == "sd15"]
    top = max((r["pixels"] for r in sd if r["variant"] == "linfusion" and "median_s" in r), default=None)
    if top:
        s, est = _speedup(_row(sd, pixels=top, variant="linfusion"), _row(sd, pixels=top, variant="sdpa"))
        if s:
            lines.append(f"SD1.5 UNet step at {top} px: LinFusion {_faster(s)} SDPA"
                         + (" (SDPA time estimated from its attn1 calls)" if est else "") + ".")
        model = next((r for r in res.get("component_model", []) if r["pixels"] == 2048), None)
        if top != 2048 and model and model["linfusion"] and model["sdpa"]:
            m = model["sdpa"] / model["linfusion"]
            lines.append(f"SD1.5 UNet step at 2048 px, component model (not run here): LinFusion "
                         f"{model['linfusion']:.0f} s vs SDPA {model['sdpa']:.0f} s, {_faster(m)} SDPA.")
            targets.append({"target": "SD1.5 UNet step at 2048 px: >= 5x faster than SDPA",
                            "measured": f"{_faster(s)} SDPA at {top} px" + (" (vs est.)" if est else "")
                                        + f"; component model at 2048 px: {m:.1f}x",
                            "met": f"{_met(m, 5)} (model)"})
        else:
            bound = attn1_free_bound(res, "sd15", top)
            targets.append({"target": "SD1.5 UNet step at 2048 px: >= 5x faster than SDPA",
                            "measured": ((f"{_faster(s)} SDPA at {top} px" + (" (vs est.)" if est else ""))
                                         if s else "-")
                                        + (f"; a step whose attn1 cost nothing would be {bound:.1f}x faster "
                                           "(the no_attn1 step, scaled by pixel count)" if bound else ""),
                            "met": _met(s, 5) if top == 2048 else "-"})
    e = res["exponents"].get("linfusion")
    sizes = sorted({r["pixels"] for r in sd if r["variant"] == "linfusion" and "median_s" in r})
    if e is not None and len(sizes) < 3:
        lines.append(f"Step time vs pixel count: only {len(sizes)} sizes ({', '.join(map(str, sizes))} px, one "
                     f"run each), fitted exponent {e:.2f}; on a shared machine this is load drift, not a "
                     "sub-linear cost: the component model below is the better guide.")
    elif e is not None:
        lines.append(f"Step time vs pixel count: exponent {e:.2f} with LinFusion"
                     + (f", {res['exponents']['sdpa']:.2f} with SDPA (measured sizes only)"
                        if res["exponents"].get("sdpa") else "") + ".")
    targets.append({"target": "time exponent vs pixels <= 1.1 (LinFusion)",
                    "measured": (f"{e:.2f} ({len(sizes)} sizes)" if e is not None else "-"),
                    "met": _met(-e if e is not None else None, -1.1) if len(sizes) >= 3 else "- (too few sizes)"})
    return lines, targets


def attn1_free_bound(res: dict, family: str, pixels: int) -> float | None:
    """SDPA step time over the attn1-free step at `pixels`: the most any attn1 replacement could gain."""
    sdpa = _row(res["steps"], family=family, pixels=pixels, variant="sdpa")
    sdpa_s = sdpa and (sdpa.get("median_s") or sdpa.get("estimated_s"))
    floor = attn1_free_step(res, family, pixels)
    return sdpa_s / floor if sdpa_s and floor else None


def _faster(s: float) -> str:
    return f"{s:.1f}x faster than" if s >= 1 else f"{1 / s:.1f}x slower than"


def _met(value, bar):
    return "-" if value is None else ("yes" if value >= bar else "no")


def write_all(res: dict, out_dir: Path, command: str) -> Path:
    return report.write(res, out_dir, command)


def console(res: dict) -> str:
    out = ["", "== LinFusion benchmarks (" + res["mode"] + ") =="]
    out += [f"GEMM peak: {res['gemm']['peak_flops'] / 1e9:.1f} GFLOP/s"]
    out += ["", "attn1 (ours/baseline time, median):"]
    for r in res["attn1"]:
        if r["backend"] == "linfusion":
            continue
        ours = _row(res["attn1"], dim=r["dim"], tokens=r["tokens"], backend="linfusion")
        out.append(f"  C={r['dim']:5d} N={r['tokens']:7d} {r['backend']:9s} {report._t(r):32s} "
                   f"ours {report._t(ours):20s} ours/base {report._ratio(ours, r)}")
    out += ["", "UNet steps:"]
    for r in res["steps"]:
        extra = f"; est. {r['estimated_s']:.0f} s" if r.get("estimated_s") else ""
        out.append(f"  {r['family']} {r['pixels']:5d} px {r['variant']:9s} {report._t(r)}{extra}")
    out += ["", "sampling:"] + [f"  {r['variant']} {r['pixels']} px x {r['steps']}: {report._t(r)}"
                                 for r in res["sampling"]]
    out += ["", "headline:"] + [f"  {h}" for h in res["headline"]]
    out += ["targets:"] + [f"  {t['target']}: {t['measured']} (met: {t['met']})" for t in res["targets"]]
    return "\n".join(out)

"""docs/benchmarks.md and its plots, rendered from benchmarks.json only: every number is computed here from
the raw rows a command wrote (ratios, fits, shares, % of GEMM), none is typed in.

Rules the page keeps: a time is the median with its spread (min-max) and n; a ratio compares medians, says n
when the two sides ran a different number of times, and is labelled not significant unless both sides ran
at least 3 times (only then is it a headline); a fit uses only the sizes every variant measured; a skipped
measurement shows its predicted time as an estimate, never as a measurement; every section names the run
(command, commit, idle or not) that measured it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from .attn1 import linfusion_flops
from .models import LINFUSION_MID_DIVISOR, attn1_levels

MiB = 2**20
NOTES = {
    "attn1": "One self-attention call, batch 2 (cond + uncond): the extension's LinFusionAttention against "
             "ComfyUI's CrossAttention with each softmax backend (per-call override), the backends of a size "
             "interleaved after a warm-up call at that size. Two layouts: SD 1.5 (8 heads, LinFusion-1-5's "
             "C -> C -> C query/key MLPs) and SDXL (64-channel heads, LinFusion-XL's C -> C/16 -> C MLPs), each at "
             "its own widths; px = the image side at which that UNet level has N tokens. FLOPs: LinFusion "
             "8NC^2 + 8NCm + 4NCd, softmax 8NC^2 + 4N^2C; % GEMM = achieved FLOP/s over the machine's measured GEMM peak (the best "
             "of three reference matmul shapes; a fused attention kernel can exceed it).",
    "unet_step": "One sampling step through `comfy.sample.sample` (Euler, CFG 7.5, cond + uncond batched) on "
                 "ComfyUI's own UNet of the family's real configuration, random weights. `linfusion` = "
                 "Apply LinFusion's core function with random LinFusion-shaped weights loaded through Load "
                 "LinFusion's; `sdpa` = PyTorch SDPA. The variants of a size run interleaved (A B, B A, ...) after "
                 "one warm-up step each at that size; every run records its time inside the attn1 modules "
                 "(forward hooks) and outside them, as wall clock and as this process's CPU time (all its "
                 "threads; other processes on a shared machine inflate it far less than the wall clock). Each "
                 "cell: median (min-max) and n. Rows of earlier runs without per-run attn1 times (back to back, "
                 "64 px warm-up) are marked `older method`.",
    "low_memory": "The same step, normal vs Low-Memory Mode (the node's defaults, through its core function).",
    "tiled_unet": "The same step, untiled vs LinFusion Tiled UNet (exact mode, fixed tile, parked on the CPU).",
    "tiled_vae": "VAE decode of a random latent: untiled `VAE.decode`, ComfyUI's `VAE Decode (Tiled)` "
                 "(`decode_tiled`, overlap tile/4) and VAE Decode (LinFusion tiled); error = max |x - untiled| "
                 "on the [0, 1] image.",
    "breakdown": "The main sampling step of each example workflow at its own size and with its own patches "
                 "(read from example_workflows/), split by forward hooks: attn1 (LinFusion), the ControlNet "
                 "(as the workflow ships it: with the LinFusion ControlNet node, its self-attention runs "
                 "LinFusion's base modules), the rest of the UNet; VAE = the workflow's decode "
                 "divided by its step count. One run each.",
    "peers": "Other implementations at the same output size, from checkouts given on the command line.",
    "controlnet": "Workflow 4's step (UNet + ControlNet, SDPA softmax elsewhere): plain SD, LinFusion UNet, and with a softmax or a LinFusion ControlNet (bench/controlnet_step.py); kept_fraction = the ControlNet graph's speed-up over the UNet's (goal 0.9).",
    "ladder": "One high-res ladder stage: one step of SD1.5 + LinFusion + Low-Memory Mode + Tiled UNet, and "
              "one tiled VAE decode (not a full sampling); peak = torch.cuda.max_memory_allocated on a GPU.",
}
METHOD = ("Times: wall clock with torch.cuda.synchronize around each call on a GPU, the median of n runs with "
          "the spread (min-max) and n; variants compared at one size run interleaved after a warm-up at that size "
          "(bench/timing.py:interleaved); memory: peak allocation beyond what was allocated before the calls (CUDA "
          "max_memory_allocated; on a CPU the resident high-water mark VmHWM, reset through "
          "/proc/self/clear_refs). A measurement predicted (power law from the previous size) to overrun the "
          "budget or the per-call limit is skipped; its predicted time is shown as an estimate.")


def find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def spread_text(values) -> str:
    """median (min-max), n of per-run values."""
    if not values:
        return "-"
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    if len(ordered) == 1:
        return f"{fmt_s(median)} (n=1)"
    return f"{fmt_s(median)} ({fmt_s(ordered[0])}-{fmt_s(ordered[-1])}, n={len(ordered)})"


def secs(r) -> str:
    if r is None:
        return "-"
    if "median_s" not in r:
        est = f"; estimate {r['predicted_s']:.0f} s" if r.get("predicted_s") else ""
        return f"skipped ({r['skipped']}{est})"
    if len(r.get("times_s") or []) > 1:
        return spread_text(r["times_s"])
    return fmt_s(r["median_s"]) + f" (n={r.get('n', 1)})"


def few(*rows) -> bool:
    return min(r.get("n", 1) for r in rows) < 3


def overlap(a, b) -> bool:
    """Whether either measured row's median lies inside the other's spread (min-max): then the ratio of the
    medians is no win or loss. (Whole spreads overlapping would let one outlier hide a real difference.)"""
    ta, tb = a.get("times_s") or [], b.get("times_s") or []
    if len(ta) < 2 or len(tb) < 2:
        return False
    return min(tb) <= a["median_s"] <= max(tb) or min(ta) <= b["median_s"] <= max(ta)


def speedup(ours, base) -> str:
    """base / ours as "4.8x faster"; says n when the two medians come from different numbers of runs,
    "not significant" when a side ran fewer than 3 times, and when a median lies inside the other's spread."""
    if not (ours and base and "median_s" in ours and "median_s" in base):
        return "-"
    s = base["median_s"] / ours["median_s"]
    text = f"{s:.2f}x faster" if 0.9 < s < 1.11 else f"{s:.1f}x faster" if s >= 1 else f"{1 / s:.1f}x slower"
    if 0.9 < s < 1.0:
        text = f"{1 / s:.2f}x slower"
    notes = []
    if ours.get("n", 1) != base.get("n", 1):
        notes.append(f"n={ours.get('n', 1)} vs {base.get('n', 1)}")
    if few(ours, base):
        notes.append("not significant")
    elif overlap(ours, base):
        notes.append("a median inside the other's spread: equal within the noise")
    return text + (f" ({': '.join(notes)})" if notes else "")


def headline_ratio(ours, base) -> str:
    """speedup(), which already says "not significant" (not a headline figure) when a side ran < 3 times."""
    return speedup(ours, base)


def mem(r) -> str:
    """Peak MiB."""
    return f"{r['peak_bytes'] / MiB:.0f}" if r and r.get("peak_bytes") is not None else "-"


def table(head, body) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, c)) + " |"
                                                                           for c in body]


def fit_exponent(points) -> float | None:
    """Least-squares slope of log(time) on log(pixel count)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(p) for p, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def crossover(rows, dim, dtype, base="sdpa", family=None) -> str:
    """The token count where LinFusion starts to beat `base`, log-interpolated between measured sizes."""
    pick = lambda r: r["dim"] == dim and r["dtype"] == dtype and r.get("family", "sd15") == (family or r.get("family", "sd15"))
    pts = sorted((r["tokens"], r["median_s"] / b["median_s"]) for r in rows
                 if pick(r) and r["backend"] == "linfusion" and "median_s" in r
                 for b in [next((x for x in rows if pick(x) and x["tokens"] == r["tokens"] and x["backend"] == base), None)]
                 if b and "median_s" in b)
    if not pts:
        return "-"
    if pts[0][1] < 1:
        return f"wins at every measured N (from {pts[0][0]})"
    for (n0, r0), (n1, r1) in zip(pts, pts[1:]):
        if r0 >= 1 > r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return f"N ~ {math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))):.0f} (between {n0} and {n1})"
    return f"does not win up to N = {pts[-1][0]}"


LEVEL_OF_WIDTH = {320: 0, 640: 1, 1280: 2}


def attn1_section(rows, gemm, gemm_of_run=None) -> list[str]:
    """gemm_of_run: run index -> that run's GEMM peaks, None for a run on a busy machine (no % GEMM then)."""
    out = []
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["backend"] != "linfusion"))
    for family in dict.fromkeys(r.get("family", "sd15") for r in rows):
        fam = [r for r in rows if r.get("family", "sd15") == family]
        for dtype in dict.fromkeys(r["dtype"] for r in fam):
            peak = gemm.get(dtype)
            for dim in sorted({r["dim"] for r in fam if r["dtype"] == dtype}):
                get = lambda n, b: find(fam, dtype=dtype, dim=dim, tokens=n, backend=b)
                body = []
                for n in sorted({r["tokens"] for r in fam if r["dim"] == dim and r["dtype"] == dtype}):
                    lin, sdpa = get(n, "linfusion"), get(n, "sdpa")
                    def pct(r):
                        top = peak if gemm_of_run is None else (gemm_of_run.get(r.get("run", 0)) or {}).get(dtype) if r else None
                        return f"{r['flops'] / r['median_s'] / top * 100:.0f}%" if top and r and "median_s" in r else "-"
                    px = (lin or sdpa or {}).get("px") or int(n ** 0.5) * 8 * 2 ** LEVEL_OF_WIDTH.get(dim, 0)
                    body.append([f"{n} ({px} px)", secs(lin)] + [secs(get(n, b)) for b in backends]
                                + [speedup(lin, sdpa), cpu_text(lin), cpu_text(sdpa), mem(lin), mem(sdpa), pct(lin),
                                   pct(sdpa)])
                heads = (fam[0].get("heads") if fam else None) or 8
                layout = ("SDXL layout (LinFusion-XL: 64-channel heads, C/16-wide MLPs)" if family == "sdxl"
                          else "SD 1.5 layout (LinFusion-1-5: 8 heads, C-wide MLPs)")
                out += ["", f"#### {layout}, {dtype}, C = {dim} (where LinFusion starts to beat SDPA: "
                            f"{crossover(fam, dim, dtype, family=family)})", ""]
                out += table(["N tokens", "LinFusion", *backends, "LinFusion vs SDPA", "CPU time LinFusion",
                              "CPU time SDPA", "peak MiB LinFusion", "peak MiB SDPA", "LinFusion % GEMM",
                              "SDPA % GEMM"], body)
    return out


def attn1_flops(family: str, tokens: int, dim: int) -> float:
    """One attn1 call at batch 2: SD1.5 has 8 heads and C-wide query/key MLPs; SDXL 64-channel heads and
    LinFusion-XL's C/16-wide MLPs."""
    if family == "sdxl":
        return linfusion_flops(2, tokens, dim, dim // 64, dim // LINFUSION_MID_DIVISOR["sdxl"])
    return linfusion_flops(2, tokens, dim, 8)


def part_text(r, key) -> str:
    """A step's time in a part (attn1, outside) per run: median (min-max), n; an older row's single figure."""
    if r is None or "median_s" not in r:
        return "-"
    if r.get(f"{key}_times_s"):
        return spread_text(r[f"{key}_times_s"])
    if key == "attn1" and r.get("attn1_s"):
        return f"{fmt_s(r['attn1_s'])} (mean; older method)"
    return "-"


def cpu_text(r, key=None) -> str:
    values = (r or {}).get(f"{key}_cpu_s" if key else "cpu_s")
    return spread_text(values) if values else "-"


def step_section(rows, gemm, quick) -> list[str]:
    out, peak = [], max(gemm.values()) if gemm else None
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        variants = list(dict.fromkeys(r["variant"] for r in fam))
        body, parts = [], []
        for px in sorted({r["px"] for r in fam}):
            lin, sdpa = find(fam, px=px, variant="linfusion"), find(fam, px=px, variant="sdpa")
            share = lambda r: f"{r['attn1_s'] / r['median_s'] * 100:.0f}%" if r and r.get("attn1_s") else "-"
            flops = sum(c * attn1_flops(family, t, d) for t, d, c in attn1_levels(family, px, quick))
            pct = f"{flops / lin['attn1_s'] / peak * 100:.0f}%" if lin and lin.get("attn1_s") and peak else "-"
            method = ("interleaved" if all((r or {}).get("interleaved") for r in (lin, sdpa) if r and "median_s" in r)
                      else "older method")
            body.append([px] + [secs(find(fam, px=px, variant=v)) for v in variants]
                        + [speedup(lin, sdpa), method, mem(lin), mem(sdpa), share(lin), pct, share(sdpa)])
            parts.append([px, part_text(lin, "attn1"), part_text(sdpa, "attn1"), part_text(lin, "outside"),
                          part_text(sdpa, "outside"), cpu_text(lin, "attn1"), cpu_text(sdpa, "attn1"),
                          cpu_text(lin, "outside"), cpu_text(sdpa, "outside")])
        out += ["", f"#### {family}", ""]
        out += table(["px", *variants, "LinFusion vs SDPA", "method", "peak MiB LinFusion", "peak MiB SDPA",
                      "attn1 share (LinFusion)", "LinFusion attn1 % GEMM", "attn1 share (SDPA)"], body)
        out += ["", f"{family}: the same steps split into attn1 and the rest (outside attn1), wall clock and CPU time:", ""]
        out += table(["px", "attn1 LinFusion", "attn1 SDPA", "outside LinFusion", "outside SDPA",
                      "attn1 CPU LinFusion", "attn1 CPU SDPA", "outside CPU LinFusion", "outside CPU SDPA"], parts)
        measured = lambda px, v: "median_s" in (find(fam, px=px, variant=v) or {})
        fitted = [v for v in variants if sum(measured(px, v) for px in {r["px"] for r in fam}) >= 2]
        common = sorted(px for px in {r["px"] for r in fam} if all(measured(px, v) for v in fitted))
        fits = {v: fit_exponent([(px * px, find(fam, px=px, variant=v)["median_s"]) for px in common]) for v in fitted}
        if len(common) >= 2:
            out += ["", f"Step time vs pixel count, fitted over the same {len(common)} sizes for every variant measured at 2+ sizes "
                        f"({', '.join(map(str, common))} px): " + ", ".join(f"{v} exponent {e:.2f}" for v, e in fits.items())]
    return out


def pairs_section(rows) -> list[str]:
    """Each variant beside the plain one it modifies (`x+low-memory` beside `x`)."""
    body = []
    for r in rows:
        if "+" not in r["variant"]:
            continue
        plain = find(rows, family=r["family"], px=r["px"], variant=r["variant"].split("+")[0])
        ratio = lambda k: (f"{r[k] / plain[k]:.2f}" if plain and r.get(k) and plain.get(k) else "-")
        body.append([r["px"], r["variant"], secs(plain), secs(r), ratio("median_s"), mem(plain), mem(r),
                     ratio("peak_bytes")])
    return table(["px", "variant", "plain time", "time", "time ratio", "plain peak MiB", "peak MiB",
                  "peak ratio"], body)


def vae_section(rows) -> list[str]:
    body = []
    for px in sorted({r["px"] for r in rows}):
        cells = [px]
        for v in ("untiled", "comfy_tiled", "ours"):
            r = find(rows, px=px, variant=v)
            cells += [secs(r), mem(r)] + ([f"{r['max_err']:.2g}" if r and "max_err" in r else "-"] if v != "untiled" else [])
        body.append(cells)
    return table(["px", "untiled", "MiB", "ComfyUI tiled", "MiB", "max err", "LinFusion tiled", "MiB", "max err"], body)


def breakdown_section(rows) -> list[str]:
    body, versus = [], []
    for r in rows:
        if "median_s" not in r:
            body.append([r["workflow"], r["family"], "-", r.get("variant", "-"), secs(r)] + ["-"] * 4)
            continue
        vae = r.get("vae_s", 0) / r["steps"] if "vae_s" in r else None
        total = r["median_s"] + (vae or 0)
        pct = lambda s: f"{s / total * 100:.0f}%" if s is not None else "-"
        cnet = r.get("controlnet_s") if r["controlnet"] else None
        attn = r.get("attn1_s")
        if "vae_s" in r:
            rest = r["median_s"] - (attn or 0) - (cnet or 0)
            body.append([r["workflow"], r["family"], f"{r['width']}x{r['height']}", r["variant"]
                         + ((" + LinFusion ControlNet" if r.get("controlnet_attention") == "linfusion"
                             else " + ControlNet") if r["controlnet"] else ""),
                         secs(r) + (f", the step of {r['same_as']}" if r.get("same_as") else ""), pct(attn),
                         pct(rest) + (" (with attn1)" if attn is None else ""), pct(cnet), pct(vae)])
        if any(x.get("workflow") == r["workflow"] and x.get("variant") == "sdpa" for x in rows):
            base = find(rows, workflow=r["workflow"], variant="sdpa", controlnet=r["controlnet"])
            cn = {"linfusion": "LinFusion ControlNet", "sdpa": "softmax ControlNet"}.get(r.get("controlnet_attention"),
                                                                                       r["controlnet"])
            versus.append([r["workflow"], f"{r['width']}x{r['height']}", r["variant"], cn, secs(r),
                           speedup(r, base) if base is not r else "-"])
    out = table(["workflow", "family", "size", "graph", "step", "attn1", "rest of UNet", "ControlNet",
                 "VAE per step"], body)
    if any(r.get("controlnet") and "median_s" in r and "controlnet_attention" not in r for r in rows):
        out += ["", "The ControlNet rows ran its softmax attention on ComfyUI's default for the host (sub-quadratic "
                "on a CPU, 2.4-3.7x slower than SDPA at 1024 px in the attn1 table), not on SDPA as the UNet's; later runs give "
                "it SDPA."]
    if versus:
        out += ["", "With and without the ControlNet, against plain SD on SDPA with a softmax ControlNet (one run "
                    "each, so no ratio here is significant):", ""]
        out += table(["workflow", "size", "attention", "ControlNet", "step", "vs SDPA (softmax ControlNet)"], versus)
    return out


def peers_section(rows, steps) -> list[str]:
    """Each peer beside this run's own step at the same size (the step includes the sampler's overhead)."""
    body = []
    for r in rows:
        ours = [find(steps, family=r.get("family"), px=r.get("px"), variant=v) for v in ("linfusion", "sdpa")]
        body.append([r["peer"], r.get("px", "-"), secs(r), mem(r)] + [secs(o) if o else "-" for o in ours])
    return table(["peer", "px", "time", "peak MiB", "LinFusion step here", "SDPA step here"], body)


def generic_section(rows, keys=None) -> list[str]:
    keys = keys or list(dict.fromkeys(k for r in rows for k in r
                                      if k not in ("times_s", "controlnet_calls", "load_average")))
    fmt = lambda k, v: secs_value(v) if k.endswith("_s") and isinstance(v, float) else (
        f"{v / MiB:.0f} MiB" if k.endswith("bytes") and isinstance(v, (int, float)) else (
            f"{v:.3g}" if isinstance(v, float) else v))
    return table(keys, [[fmt(k, r.get(k, "-")) for k in keys] for r in rows])


def secs_value(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def headline(run) -> list[str]:
    sec, lines = run["sections"], []
    for r in sec.get("attn1", []):
        if r["backend"] == "linfusion" and r.get("family", "sd15") == "sdxl" and "median_s" in r:
            b = find(sec["attn1"], family="sdxl", tokens=r["tokens"], dim=r["dim"], dtype=r["dtype"], backend="sdpa")
            if b and "median_s" in b:
                lines.append(f"SDXL attn1 (LinFusion-XL layout) at {r.get('px')} px, C = {r['dim']}, N = {r['tokens']}, "
                             f"{r['dtype']}: LinFusion {secs(r)}, SDPA {secs(b)}: {headline_ratio(r, b)}")
    for r in sec.get("attn1", []):
        if (r["backend"] == "linfusion" and r.get("family", "sd15") == "sd15" and r["tokens"] == 16384
                and r["dim"] == 320 and "median_s" in r):
            b = find(sec["attn1"], tokens=16384, dim=320, dtype=r["dtype"], backend="sdpa")
            if b and "median_s" in b:
                lines.append(f"attn1 at N = 16384 (1024 px), C = 320, {r['dtype']}: LinFusion {secs(r)}, SDPA "
                             f"{secs(b)}: {headline_ratio(r, b)}")
    for family in ("sd15", "sdxl"):
        rows = [r for r in sec.get("unet_step", []) if r["family"] == family]
        both = [px for px in sorted({r["px"] for r in rows}) if all("median_s" in (find(rows, px=px, variant=v) or {})
                                                                     for v in ("linfusion", "sdpa"))]
        for px in both:
            lin, sdpa = find(rows, px=px, variant="linfusion"), find(rows, px=px, variant="sdpa")
            lines.append(f"{family} step at {px} px, both measured: LinFusion {secs(lin)}, SDPA {secs(sdpa)}: "
                         f"{headline_ratio(lin, sdpa)}")
    for r in sec.get("low_memory", []):
        plain = find(sec["low_memory"], px=r["px"], variant=r["variant"].split("+")[0])
        if r["variant"] == "linfusion+low-memory" and plain and r.get("peak_bytes") and plain.get("peak_bytes"):
            lines.append(f"Low-Memory Mode at {r['px']} px with LinFusion: peak {r['peak_bytes'] / plain['peak_bytes']:.2f}"
                         f" of normal mode's, time {r['median_s'] / plain['median_s']:.2f} (n={r.get('n', 1)})")
    for r in sec.get("tiled_vae", []):
        if r["variant"] == "ours" and "max_err" in r:
            comfy = find(sec["tiled_vae"], px=r["px"], variant="comfy_tiled") or {}
            lines.append(f"Tiled VAE decode at {r['px']} px: max error {r['max_err']:.1g} (ComfyUI's tiled decode: "
                         f"{comfy.get('max_err', float('nan')):.2g})")
    return lines


def idle(record: dict, before: dict | None = None) -> bool:
    """Idle: other processes kept under a fifth of a core busy on average during the run (other_cores);
    for a run that did not record it, a 1-minute load under 1 at the start (or at most cores + 0.5 when the
    run just before it ended under 2 minutes earlier: that load is its tail) and at most cores + 0.5 at the
    end (the benchmark itself keeps the cores busy)."""
    if record.get("other_cores") is not None:
        return record["other_cores"] < 0.2
    machine, cores = record.get("machine", {}), record.get("machine", {}).get("cpu_cores") or 1
    start, end = machine.get("load_start", 99), record.get("load_end")
    tail = before is not None and _minutes(record.get("started")) - _minutes(before.get("started")) \
        - before.get("elapsed_s", 0) / 60 < 2
    return (start < 1.0 or (tail and start <= cores + 0.5)) and (end if end is not None else 99) <= cores + 0.5


def _minutes(stamp) -> float:
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M UTC")) / 60
    except (TypeError, ValueError):
        return float("-inf")


def idle_words(record: dict, before: dict | None = None) -> str:
    mach = record.get("machine", {})
    others = record.get("other_cores")
    return ("idle" if idle(record, before) else "NOT idle") + (
        f" (other processes: {others:.2f} cores)" if others is not None else
        f" (1-min load {num(mach.get('load_start'))} / {num(record.get('load_end'))})")


def num(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "?"


def runs_table(runs: list[dict], used: set[int]) -> list[str]:
    """One line per command whose rows are on this page (a run keeps the rows it did not re-measure; runs
    whose rows were all re-measured since stay in the json only)."""
    body = [[f"#{i}", f"`{r.get('command', '?')}`", r.get("started", "?"), f"{r.get('elapsed_s', 0) / 60:.1f}",
             r.get("machine", {}).get("commit", "?"),
             idle_words(r, runs[i - 1] if i else None) + (f"; {r['note']}" if r.get("note") else ""),
             ", ".join(r.get("sections", []))] for i, r in enumerate(runs) if i in used]
    return table(["run", "command", "started", "min", "code measured", "machine",
                  "sections written"], body)


def slot_section(name, run) -> list[str]:
    m, mach = run["meta"], run["meta"]["machine"]
    tiny = m["plan"] in ("quick", "smoke")
    cores = mach.get("cpu_cores") or 1
    out = [f"## {name}", ""]
    if tiny:
        out += [f"**{m['plan']} run: small models at tiny sizes, a check that every code path runs. Do not quote "
                "these numbers.**" + (" Not measured on a GPU." if mach["device"] == "cpu" and name.startswith("GPU") else ""), ""]
    runs = m.get("runs") or []
    if len(runs) > 1:
        out += ["The rows below were measured by these commands (each section names its run; a run's sections "
                f"replace the same sections of earlier runs). Idle: other processes kept less than a fifth of a core "
                "busy on average during the run (all CPU time from /proc/stat minus the run's own); for runs that "
                "did not record that, a 1-minute load average under 1 at the start (or the tail of the run just "
                f"before) and at most {cores} cores + 0.5 at the end. A run on a NOT idle machine has inflated, "
                "drifting absolute times.", ""] + runs_table(runs, {r.get("run", 0) for rows in run["sections"].values()
                                                                 for r in rows}) + [""]
    else:
        ok = idle(m)
        out += [f"`{m['command']}` started {m['started']}, {m.get('elapsed_s', 0) / 60:.1f} min, code measured: "
                f"{mach['commit']}. The machine was {'idle' if ok else 'NOT idle'} (1-minute load average "
                f"{mach.get('load_start', '?')} at the start, {m.get('load_end', '?')} at the end, {cores} cores; the "
                "benchmark itself keeps them busy)."
                + ("" if ok else " Other work shared it: absolute times are inflated and drift; ratios of "
                                 "neighbouring measurements are the more robust numbers."), ""]
    out += table(["machine", ""], [[k, v] for k, v in mach.items() if k not in ("commit",)]
                 + [[f"measured GEMM peak ({d})", f"{f / 1e9:.1f} GFLOP/s"] for d, f in m.get("gemm_peak_flops", {}).items()])
    out += ["", "Headline (computed from the rows below):", ""] + [f"- {h}" for h in headline(run)]
    sec, quick = run["sections"], tiny
    titles = [("attn1", "One attn1 call"), ("unet_step", "UNet step, LinFusion vs SDPA"),
              ("low_memory", "Low-Memory Mode vs normal"), ("tiled_unet", "Tiled UNet vs untiled"),
              ("tiled_vae", "Tiled VAE decode"), ("breakdown", "Where the time goes in the shipped workflows"),
              ("ladder", "One ladder stage at 8K / 16K"), ("peers", "Peers"), ("controlnet", "LinFusion ControlNet")]
    for key, title in titles:
        if key not in sec:
            continue
        rows = sec[key]
        out += ["", f"### {title}", "", NOTES[key]]
        made = sorted({r.get("run", 0) for r in rows})
        if len(runs) > 1:
            out += ["", "Measured by run " + ", ".join(f"#{i}" for i in made) + "."]
        # % GEMM only against the GEMM peak its own run measured, on an idle machine (a busy one makes both meaningless)
        gemm_of_run = {i: r.get("gemm_peak_flops") if idle(r, runs[i - 1] if i else None) else None
                       for i, r in enumerate(runs)} if len(runs) > 1 else None
        gemm = (runs[made[-1]] if len(runs) > 1 and made[-1] < len(runs) else m).get("gemm_peak_flops") or m.get(
            "gemm_peak_flops", {})
        body = {"attn1": lambda: attn1_section(rows, gemm, gemm_of_run), "unet_step": lambda: step_section(rows, gemm, quick),
                "low_memory": lambda: pairs_section(rows), "tiled_unet": lambda: pairs_section(rows),
                "tiled_vae": lambda: vae_section(rows), "breakdown": lambda: breakdown_section(rows),
                "peers": lambda: peers_section(rows, sec.get("unet_step", []))}.get(
            key, lambda: generic_section(rows))()
        out += [""] + body
    if m.get("plan_settings"):
        out += ["", f"Plan ({m['plan']}): " + ", ".join(f"{k} {v}" for k, v in m["plan_settings"].items())]
    return out


def render(doc: dict, plots: list[str]) -> str:
    lines = ["# Benchmarks: LinFusion in ComfyUI", "",
             "Rendered by bench/page.py from `benchmarks.json` beside this page; every number below is computed "
             "from the rows a command wrote there. " + METHOD, ""]
    lines += slot_section("CPU run", doc["cpu"]) if "cpu" in doc else ["## CPU run", "", "Not measured yet."]
    lines += [""] + (slot_section("GPU run", doc["gpu"]) if "gpu" in doc else [
        "## GPU run", "", "Not measured on a GPU: `bench/gpu.sh` stays ready for the day a device is lent. It runs the GPU plan (attn1 in fp16 and bf16, "
        "SD1.5 and SDXL steps up to 4096 px, one ladder stage at 8K and 16K, the crossover per width) in under "
        "7 minutes on one H200, with the same interleaved method, and adds its section here."])
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    page = out / "benchmarks.md"
    page.write_text(render(doc, plot(doc, out)))
    return page


def plot(doc: dict, out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    for slot, run in doc.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, ax, x, group in (("attn1", axes[0], "tokens", ("dtype", "dim", "backend")),
                                  ("unet_step", axes[1], "px", ("family", "variant"))):
            rows = [r for r in run["sections"].get(key, []) if "median_s" in r]
            for g in dict.fromkeys(tuple(r[k] for k in group) for r in rows):
                pts = sorted((r[x], r["median_s"]) for r in rows if tuple(r[k] for k in group) == g)
                if len(pts) > 1:
                    ax.loglog(*zip(*pts), marker="o", label=" ".join(map(str, g)))
            ax.set(xlabel="tokens N" if x == "tokens" else "image side px", ylabel="seconds (median)",
                   title="one attn1 call" if key == "attn1" else "one sampling step")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        fig.tight_layout()
        names.append(f"bench_{slot}.png")
        fig.savefig(out / names[-1], dpi=100)
        plt.close(fig)
    return names

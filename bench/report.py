"""docs/benchmarks.md, its plots and the raw numbers (benchmarks.json) from one run's results."""
from __future__ import annotations

import json
from pathlib import Path

MiB = 2**20


def _t(row) -> str:
    if row is None:
        return "-"
    if "median_s" in row:
        s = row["median_s"]
        txt = f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"
        return txt + (f" (n={row['reps']})" if row.get("reps", 1) != 1 else "")
    if row.get("predicted_s"):
        return f"skipped (pred. {row['predicted_s']:.0f} s)"
    return f"skipped ({row['skipped']})"


def _ratio(ours, base) -> str:
    if ours is None or base is None or "median_s" not in ours:
        return "-"
    if "median_s" in base:
        r = ours["median_s"] / base["median_s"]
        return f"{r:.3f} ({1 / r:.1f}x faster)" if r < 1 else f"{r:.2f} ({r:.1f}x slower)"
    return "-"


def _mem(row) -> str:
    if row is None or row.get("peak_extra_bytes") is None:
        return "-"
    return f"{row['peak_extra_bytes'] / MiB:.0f}"


def _find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def attention_tables(res) -> list[str]:
    rows, out = res["attn1"], []
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["backend"] != "linfusion"))
    for dim in sorted({r["dim"] for r in rows}):
        out += [f"\n#### C = {dim} (heads 8, batch 2)\n"]
        head = ["N tokens (px at level 0)", "LinFusion"] + backends + ["ours/SDPA", f"ours/{backends[1]}"]
        head += ["peak MiB LinFusion", "peak MiB SDPA", "LinFusion % GEMM", "SDPA % GEMM"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in sorted({r["tokens"] for r in rows if r["dim"] == dim}):
            get = lambda b: _find(rows, dim=dim, tokens=n, backend=b)
            lin, sdpa = get("linfusion"), get("sdpa")
            cells = [f"{n} ({int(n ** 0.5) * 8} px)", _t(lin)] + [_t(get(b)) for b in backends]
            cells += [_ratio(lin, sdpa), _ratio(lin, get(backends[1])), _mem(lin), _mem(sdpa)]
            cells += [f"{r['flop_fraction'] * 100:.0f}%" if r and "flop_fraction" in r else "-" for r in (lin, sdpa)]
            out.append("| " + " | ".join(cells) + " |")
    return out


def step_table(rows, family) -> list[str]:
    rows = [r for r in rows if r["family"] == family]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = ["px"] + variants + ["ours/SDPA", "peak GiB LinFusion", "peak GiB SDPA"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for px in sorted({r["pixels"] for r in rows}):
        get = lambda v: _find(rows, pixels=px, variant=v)
        lin, sdpa = get("linfusion"), get("sdpa")
        ratio = _ratio(lin, sdpa)
        if ratio == "-" and sdpa and sdpa.get("estimated_s") and lin and "median_s" in lin:
            r = lin["median_s"] / sdpa["estimated_s"]
            ratio = f"{r:.3f} ({1 / r:.1f}x faster, vs est.)"
        cells = [str(px)]
        for v in variants:
            r = get(v)
            cell = _t(r)
            if r and r.get("estimated_s"):
                cell += f"; est. {r['estimated_s']:.0f} s"
            cells.append(cell)
        gib = lambda r: f"{r['peak_extra_bytes'] / 2**30:.2f}" if r and r.get("peak_extra_bytes") is not None else "-"
        cells += [ratio, gib(lin), gib(sdpa)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def machine_note(res: dict) -> str:
    """Whether other work shared the machine, read from the load averages the run recorded."""
    m = res["machine"]
    start, end = (m.get(f"load average (1 min) at {when}") for when in ("start", "end"))
    cores = int(m.get("cpu_cores") or 1)
    counting = ("every time is the median of the repeats shown as n=..., a time without n is a single run, "
                "and every ratio compares numbers from this one run.")
    if start is None or end is None:
        return "Load average not recorded for this run: " + counting
    try:
        # The run itself keeps `cores` threads busy; the 1-minute average still carries setup before it.
        quiet = float(start) < 1.0 and float(end) <= cores + 0.5
    except ValueError:      # a hand-edited value such as "11.7 (attn1) / 15.9 (UNet steps)"
        quiet = False
    if quiet:
        return (f"Nothing else ran on the machine (1-minute load average {start} at the start, {end} at the end, "
                f"with the benchmark itself busy on {cores} cores): " + counting)
    return (f"Other jobs shared the machine (1-minute load average {start} at the start, {end} at the end, on "
            f"{cores} cores), so absolute times are inflated and drift: " + counting)


def write(res: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str))
    plots = plot(res, out_dir)
    m = res["machine"]
    lines = [
        "# Benchmarks: LinFusion attention vs ComfyUI's attention backends",
        "",
        f"Produced on {res['started']} by the command(s) under Reproduce ({res['mode']} mode, "
        f"{res['elapsed_s'] / 60:.1f} min). Every number on this page comes from that run"
        + (" except those this paragraph names" if res.get("runs_note") else "") + "; "
        "`benchmarks.json` beside it holds the raw timings." + (f" {res['runs_note']}" if res.get("runs_note") else ""),
        "",
        "## Machine",
        "",
        "| | |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    g = res["gemm"]
    samples = g.get("samples") or [g["peak_flops"]]
    lines += [f"| measured fp32 GEMM peak | {g['peak_flops'] / 1e9:.1f} GFLOP/s (best of {len(samples)} "
              f"measurements: {', '.join(f'{v / 1e9:.1f}' for v in samples)}) |", ""]
    lines += [machine_note(res), "", "## Headline", ""] + [f"- {h}" for h in res["headline"]]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in res["targets"]]
    lines += ["", "## 1. One attn1 call", "", res["notes"]["attn1"]] + attention_tables(res)
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    lines += ["", "## 2. SD1.5 UNet step (860 M params, fp32, batch 2)", "", res["notes"]["unet"], ""]
    lines += step_table(res["steps"], "sd15")
    lines += ["", "Fitted exponent of step time vs pixel count (1 = linear): " +
              ", ".join(f"{k} {v:.2f}" for k, v in res["exponents"].items() if v is not None), ""]
    lines += ["### Component model for sizes too slow to run here", "", res["notes"]["model"], "",
              "| px | LinFusion model | LinFusion measured | SDPA model | SDPA measured | model ours/SDPA |",
              "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.0f} s" if v else "-"
    for r in res.get("component_model", []):
        ratio = (f"{r['linfusion'] / r['sdpa']:.3f} ({r['sdpa'] / r['linfusion']:.1f}x faster)"
                 if r["linfusion"] and r["sdpa"] else "-")
        lines.append(f"| {r['pixels']} | {fmt(r['linfusion'])} | {fmt(r['linfusion_measured'])} | "
                     f"{fmt(r['sdpa'])} | {fmt(r['sdpa_measured'])} | {ratio} |")
    lines += ["", "## 3. SDXL UNet step (2.6 B params, fp32, batch 2)", "", res["notes"]["sdxl"], ""]
    lines += step_table(res["steps"], "sdxl")
    lines += ["", "## 4. Sampling through ComfyUI", "", res["notes"]["sampling"], ""]
    if res["sampling"]:
        lines += ["| variant | px | steps | time |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['pixels']} | {r['steps']} | {_t(r)} |" for r in res["sampling"]]
    else:
        lines += ["Not part of the run this page comes from (`--sections`)."]
    lim = res["limits"]
    lines += ["", "## Reproduce", "", "```", command, "```", "", res["notes"]["method"],
              "", f"Limits of this run: an attn1 call predicted to take more than {lim['max_call_s']:.0f} s, "
              f"or a UNet step more than {lim['max_step_s']:.0f} s, is skipped and shown as "
              "`skipped (pred. X s)` with its extrapolated time (`--max-call-s`, `--max-step-s`).", ""]
    page = out_dir / "benchmarks.md"
    page.write_text("\n".join(lines))
    return page


def plot(res: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    rows = res["attn1"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {320: "-", 640: "--", 1280: ":"}
    colors = {}
    for dim in sorted({r["dim"] for r in rows}):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["tokens"], r["median_s"], r.get("peak_extra_bytes")) for r in rows
                         if r["dim"] == dim and r["backend"] == backend and "median_s" in r)
            if len(pts) < 2:
                continue
            label = f"{backend} C={dim}"
            color = colors.setdefault(backend, f"C{len(colors)}")      # one colour a backend, one dash a width
            ax_t.loglog([p[0] for p in pts], [p[1] for p in pts], styles.get(dim, "-"), marker="o", label=label,
                        color=color)
            if dim == 320 and all(p[2] is not None for p in pts):
                ax_m.loglog([p[0] for p in pts], [max(p[2], 1) / MiB for p in pts], marker="o", label=label,
                            color=color)
    ax_t.set(xlabel="tokens N", ylabel="seconds per attn1 call", title="attn1 time (batch 2)")
    ax_m.set(xlabel="tokens N", ylabel="peak extra MiB", title="attn1 peak extra memory, C=320")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_attn1.png", dpi=110)
    plt.close(fig)
    names.append("bench_attn1.png")

    steps = [r for r in res["steps"] if r["family"] == "sd15"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in steps):
        pts = sorted((r["pixels"], r["median_s"]) for r in steps if r["variant"] == variant and "median_s" in r)
        est = sorted((r["pixels"], r["estimated_s"]) for r in steps if r["variant"] == variant and r.get("estimated_s"))
        if pts:
            line, = ax.loglog([p[0] ** 2 for p in pts], [p[1] for p in pts], marker="o", label=variant)
            if est:
                ax.loglog([p[0] ** 2 for p in pts[-1:] + est], [p[1] for p in pts[-1:] + est], "--",
                          color=line.get_color(), label=f"{variant} (est. from attn1)")
    ax.set(xlabel="pixel count", ylabel="seconds per UNet step", title="SD1.5 UNet step (batch 2, fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_unet_step.png", dpi=110)
    plt.close(fig)
    names.append("bench_unet_step.png")
    return names

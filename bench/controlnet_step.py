"""Workflow 4's sampling step (SD1.5 UNet + ControlNet, full shapes, random weights): does the ControlNet graph
keep LinFusion's speed-up?

    python3 scripts/comfy_host.py python bench/controlnet_step.py --sizes 1024,2048
    python3 scripts/comfy_host.py python bench/controlnet_step.py --sizes 1024 --threads 1 --out /tmp/cn.json

Five variants per size, each one real sampler step (comfy.sample, CFG: cond + uncond in one batch of 2, the
ControlNet applied by ComfyUI's own Apply ControlNet node), softmax attention on PyTorch SDPA everywhere:
  sd                  plain SD UNet, no ControlNet
  linfusion           LinFusion UNet (Apply LinFusion), no ControlNet
  sd_cn               plain SD UNet + softmax ControlNet
  linfusion_cn        LinFusion UNet + softmax ControlNet
  linfusion_lf_cn     LinFusion UNet + LinFusion ControlNet (the LinFusion ControlNet node, base modules)
The goal: speed-up(sd_cn -> linfusion_lf_cn) >= 90 % of speed-up(sd -> linfusion) at the same size.

The models are bench/models.py's and the timing bench/timing.py's, as for every other section; run_all.py's
`controlnet` section calls `run(sizes, ...)`, which returns one dict per (size, variant) plus one summary dict
per size.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("LinFusion")

VARIANTS = ("sd", "linfusion", "sd_cn", "linfusion_cn", "linfusion_lf_cn")
GOAL = 0.9
WARMUP_PIXELS = 256


def sdpa_everywhere():
    """ComfyUI's ControlNet passes no transformer_options, so the per-call attention override cannot reach it:
    select PyTorch SDPA for every softmax attention the way --use-pytorch-cross-attention does. Returns undo."""
    import comfy.ldm.modules.attention as attn

    saved = attn.optimized_attention
    attn.optimized_attention = attn.attention_pytorch
    return lambda: setattr(attn, "optimized_attention", saved)


def one_step(model, control, pixels: int, seed: int = 0) -> None:
    """One sampler step at pixels x pixels (batch 2 = cond + uncond), as workflow 4 runs it."""
    import comfy.sample
    import nodes

    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    if control is not None:
        cells = (torch.rand(1, pixels // 64, pixels // 64, 1, generator=g) > 0.5).float()
        hint = cells.repeat_interleave(64, 1).repeat_interleave(64, 2).expand(-1, -1, -1, 3)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 0.8, 0.0, 1.0)
    latent = torch.zeros(1, 4, pixels // 8, pixels // 8)
    noise = torch.randn(latent.shape, generator=g)
    with torch.no_grad():
        comfy.sample.sample(model, noise, 1, 7.5, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for pixels in sorted({r["pixels"] for r in rows if "variant" in r}):
        t = {r["variant"]: r["median_s"] for r in rows if r.get("pixels") == pixels and "variant" in r}
        s = {"pixels": pixels, "summary": True}
        if "sd" in t and "linfusion" in t:
            s["unet_speedup"] = t["sd"] / t["linfusion"]
        if "sd_cn" in t and "linfusion_lf_cn" in t:
            s["graph_speedup"] = t["sd_cn"] / t["linfusion_lf_cn"]
        if "sd_cn" in t and "linfusion_cn" in t:
            s["graph_speedup_softmax_controlnet"] = t["sd_cn"] / t["linfusion_cn"]
        if "unet_speedup" in s and "graph_speedup" in s:
            s["kept_fraction"] = s["graph_speedup"] / s["unet_speedup"]
            s["goal"] = GOAL
            s["goal_met"] = s["kept_fraction"] >= GOAL
        if "linfusion_cn" in t and "linfusion" in t and "linfusion_lf_cn" in t:
            s["controlnet_s_softmax"] = t["linfusion_cn"] - t["linfusion"]
            s["controlnet_s_linfusion"] = t["linfusion_lf_cn"] - t["linfusion"]
        out.append(s)
    return out


def run(sizes, variants=VARIANTS, repeats: int = 1, core=None, warmup: bool = True, device=None,
        quick: bool = False, work: Path | None = None) -> list[dict]:
    """Time every variant at every size; returns rows {pixels, variant, times_s, median_s} and one summary row
    per size (speed-ups and the fraction of the UNet's speed-up the ControlNet graph keeps). The models are
    bench/models.py's (the same UNet, weights and ControlNet builders as every other section)."""
    from bench import models as bench_models
    from bench import timing
    from scratch import scratch_dir   # tests/, on sys.path wherever the bench runs

    if core is None:
        core = next(m for name, m in sys.modules.items() if name.endswith(".linfusion_core")
                    and hasattr(m, "controlnet_patch"))
    device = torch.device(device or bench_models.device())
    work = work or scratch_dir("linfusion-bench-cn-")
    unet = bench_models.build("sd15", quick)
    weights = bench_models.linfusion_weights(core, unet, "sd15", work / "linfusion")
    lf_unet, _ = core.patching.patch.apply_linfusion(unet, weights)
    control = bench_models.controlnet("sd15", quick)
    lf_control, info = core.controlnet.controlnet_patch.apply_linfusion_controlnet(control, weights)
    log.info("[bench] %s", info)
    models = {"sd": (unet, None), "linfusion": (lf_unet, None), "sd_cn": (unet, control),
              "linfusion_cn": (lf_unet, control), "linfusion_lf_cn": (lf_unet, lf_control)}
    undo = sdpa_everywhere()
    rows = []
    try:
        for pixels in sizes:
            for variant in variants:
                model, cn = models[variant]
                if warmup:   # a small step first: one-time set-up costs stay out of the timed full-size step
                    one_step(model, cn, min(WARMUP_PIXELS, pixels))
                calls = []   # the ControlNet really ran at this size (a check on the figures, not a timing)
                hook = control.control_model.register_forward_hook(lambda m, a, k, o: calls.append(
                    tuple(k["x"].shape)), with_kwargs=True)
                seeds = iter(range(repeats))
                try:
                    timed = timing.measure(lambda: one_step(model, cn, pixels, seed=next(seeds)), device, repeats,
                                           warmup=False)
                finally:
                    hook.remove()
                rows.append({"pixels": pixels, "variant": variant, "times_s": timed["times_s"],
                             "median_s": timed["median_s"], "peak_bytes": timed["peak_bytes"],
                             "controlnet_calls": [list(c) for c in calls], "load_average": list(os.getloadavg())})
                log.info("[bench] %d px %-16s %.1f s", pixels, variant, rows[-1]["median_s"])
    finally:
        undo()
    return rows + summarize(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048", help="square sizes in px")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--note", default="", help="e.g. 'machine shared with other jobs, not idle'")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "controlnet_step.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]   # bench.* and the test harness
    from comfy_harness import get_host   # boots ComfyUI and loads this checkout with its own loader
    from scratch import scratch_dir

    host = get_host(scratch_dir("linfusion-bench-cn-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run([int(s) for s in args.sizes.split(",") if s], args.variants.split(","), args.repeats,
               core=host.import_core())
    result = {"command": "python3 scripts/comfy_host.py python bench/controlnet_step.py " + " ".join(sys.argv[1:]),
              "started": started, "device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32",
              "batch": 2, "attention": "PyTorch SDPA (softmax)", "note": args.note, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(json.dumps(r))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Self-contained (its own model builders and weights), so bench/ can be restructured around it: `run(sizes, ...)`
returns one dict per (size, variant) plus one summary dict per size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("LinFusion")

# ComfyUI's unet_config for the SD1.5 checkpoint (comfy.model_detection), the ControlNet mirrors it.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
VARIANTS = ("sd", "linfusion", "sd_cn", "linfusion_cn", "linfusion_lf_cn")
GOAL = 0.9
WARMUP_PIXELS = 256


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale activations: weights std 1/sqrt(fan_in), norm weights 1, biases 0 (ComfyUI layers skip init)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            else:
                p.fill_(1.0 if name == "weight" else 0.0)
    return module


def build_unet(seed: int = 0):
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    fill_random(model.diffusion_model, seed).eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def build_controlnet(seed: int = 1):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in SD15_UNET.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **config, dtype=torch.float32, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    return comfy.controlnet.ControlNet(fill_random(net, seed).eval(), load_device=torch.device("cpu"))


def linfusion_weights(core, patcher, seed: int = 2):
    """Random LinFusion-1-5-layout weights (16 modules, MLP width = C) named after the UNet's attn1 modules."""
    ckpt = core.checkpoint
    sites = core.block_map.attn1_sites(patcher.model.diffusion_model, patcher.model.model_config.unet_config)
    specs, sd = [], {}
    for i, s in enumerate(sites):
        module = fill_random(core.module.LinFusionAttention(s.dim, s.heads, None, dtype=torch.float32), seed + i)
        sd.update({f"{i}.{k}": v for k, v in module.state_dict().items()})
        specs.append(ckpt.ModuleSpec(i, s.dim, s.dim, s.heads, s.diffusers_name))
    return ckpt.LinFusionWeights("bench-LinFusion-1-5", specs, sd, "config.json")


def sdpa_everywhere():
    """ComfyUI's ControlNet passes no transformer_options, so the per-call attention override cannot reach it:
    select PyTorch SDPA for every softmax attention the way --use-pytorch-cross-attention does. Returns undo."""
    import comfy.ldm.modules.attention as attn

    saved = attn.optimized_attention
    attn.optimized_attention = attn.attention_pytorch
    return lambda: setattr(attn, "optimized_attention", saved)


def one_step(model, control, pixels: int, seed: int = 0) -> float:
    """Seconds of one sampler step at pixels x pixels (batch 2 = cond + uncond)."""
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
    start = time.perf_counter()
    with torch.no_grad():
        comfy.sample.sample(model, noise, 1, 7.5, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)
    return time.perf_counter() - start


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


def run(sizes, variants=VARIANTS, repeats: int = 1, core=None, warmup: bool = True) -> list[dict]:
    """Time every variant at every size; returns rows {pixels, variant, times_s, median_s} and one summary row
    per size (speed-ups and the fraction of the UNet's speed-up the ControlNet graph keeps)."""
    import statistics

    if core is None:
        core = next(m for name, m in sys.modules.items() if name.endswith(".linfusion_core")
                    and hasattr(m, "controlnet_patch"))
    unet = build_unet()
    weights = linfusion_weights(core, unet)
    lf_unet, _ = core.patch.apply_linfusion(unet, weights)
    control = build_controlnet()
    lf_control, info = core.controlnet_patch.apply_linfusion_controlnet(control, weights)
    log.info("[bench] %s", info)
    models = {"sd": (unet, None), "linfusion": (lf_unet, None), "sd_cn": (unet, control),
              "linfusion_cn": (lf_unet, control), "linfusion_lf_cn": (lf_unet, lf_control)}
    undo = sdpa_everywhere()
    rows = []
    try:
        for pixels in sizes:
            for variant in variants:
                model, cn = models[variant]
                if warmup:
                    one_step(model, cn, WARMUP_PIXELS)
                calls = []   # the ControlNet really ran at this size (a check on the figures, not a timing)
                hook = control.control_model.register_forward_hook(lambda m, a, k, o: calls.append(
                    tuple(k["x"].shape)), with_kwargs=True)
                try:
                    times = [one_step(model, cn, pixels, seed=i) for i in range(repeats)]
                finally:
                    hook.remove()
                rows.append({"pixels": pixels, "variant": variant, "times_s": times,
                             "median_s": statistics.median(times), "controlnet_calls": [list(c) for c in calls],
                             "load_average": list(os.getloadavg())})
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
    sys.path[:0] = [str(REPO / "tests")]
    from comfy_harness import get_host   # boots ComfyUI and loads this checkout with its own loader
    import tempfile

    host = get_host(Path(tempfile.mkdtemp(prefix="linfusion-bench-cn-")))
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

"""Where the time goes in the graphs we ship: the main sampling step of each example workflow at its own
size, split into LinFusion attention (attn1), the rest of the UNet, a ControlNet (as the workflow ships it:
with an active LinFusion ControlNet node its self-attention runs LinFusion's base modules, else softmax on
SDPA) and the VAE decode (its time over the workflow's step count). Workflow 4's step is also measured with
and without its ControlNet, against plain SD with a softmax ControlNet.

The size, family, patches, step count and decoder of each workflow are read from example_workflows/*.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import models
from .controlnet_step import sdpa_everywhere
from .timing import PartClock, measure

log = logging.getLogger("LinFusion")
WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"


def workflows() -> list[dict]:
    """One entry per example workflow: what its main sampling step runs, or why it has none to measure."""
    found = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        graph = json.loads(path.read_text())["nodes"]
        nodes = {n["type"]: n.get("widgets_values") or [] for n in graph}
        active = {n["type"] for n in graph if n.get("mode", 0) == 0}      # 2 muted, 4 bypassed
        ckpt = str((nodes.get("CheckpointLoaderSimple") or [""])[0])
        wf = {"workflow": path.stem, "family": "sdxl" if "xl" in ckpt.lower() else "sd15",
              "variant": "+".join(["linfusion" if "ApplyLinFusion" in nodes else "sdpa"]
                                  + ["low-memory"] * ("LinFusionLowMemory" in nodes)
                                  + ["tiled"] * ("LinFusionTiledUNet" in nodes)),
              "controlnet": "ControlNetApplyAdvanced" in nodes,
              # the LinFusion ControlNet node (source widget first: the shipped "base modules") or softmax
              "controlnet_attention": ("linfusion" if "LinFusionControlNet" in active else "sdpa")
              if "ControlNetApplyAdvanced" in nodes else None,
              "tile": (nodes.get("LinFusionTiledUNet") or [64])[0],
              "vae_tile": (nodes.get("LinFusionVAEDecodeTiled") or [None])[0]}
        ladder = nodes.get("LinFusionProgressiveUpscale")
        sampler = nodes.get("KSampler")
        if "EmptyLatentImage" not in nodes:
            wf["skipped"] = "its size is set by an input image"
        else:
            w, h = nodes["EmptyLatentImage"][:2]
            scale = 2 ** ladder[2] if ladder else 1         # the ladder doubles the side at every stage
            wf.update(width=w * scale, height=h * scale, steps=(ladder[7] if ladder else sampler[2]))
        found.append(wf)
    return found


def run(core, family, base, weights, vae, cnet, quick: bool, budget, predict_step, max_step_s: float) -> list[dict]:
    """The workflows of one family; cnet: family -> ControlNet; predict_step(family, pixels) -> seconds.
    A step predicted over max_step_s is skipped with its estimate; a step another workflow already measured
    (same family, patches, ControlNet and size) is not run twice: its row names that workflow."""
    device, rows, done = models.device(), [], {}
    for wf in (w for w in workflows() if w["family"] == family):
        if "skipped" in wf:
            rows.append(wf)
            continue
        div = 32 if quick else 1      # quick: the same graphs at 1/32 of the side
        w, h = (max(64, wf["width"] // div // 64 * 64), max(64, wf["height"] // div // 64 * 64))
        wf.update(width=w, height=h)
        shipped = wf.get("controlnet_attention")
        plans = [(wf["variant"], wf["controlnet"], shipped)]
        if wf["controlnet"]:
            plans += [("sdpa", True, "sdpa"), (wf["variant"], False, None), ("sdpa", False, None)]
        for variant, with_cnet, cnet_attention in plans:
            row = dict(wf, variant=variant, controlnet=with_cnet, controlnet_attention=cnet_attention)
            same = (variant, with_cnet, cnet_attention, w, h, wf["tile"], wf["vae_tile"])
            if same in done:
                own = (variant, with_cnet, cnet_attention) == plans[0]     # its decode is timed too
                keep = ("times_s", "median_s", "n", "peak_bytes", "attn1_s", "controlnet_s") + ("vae_s",) * own
                rows.append(dict(row, same_as=done[same]["workflow"], **{k: done[same][k] for k in keep if k in done[same]}))
                continue
            guess = predict_step(family, w * h, variant)
            skip = budget.refuse(guess, 1, max_step_s) or (None if guess is not None or quick else {
                "skipped": f"no measured {family} step to predict its time from (run the {family} section too)"})
            if skip:
                rows.append({**row, **skip})
                continue
            model = models.variant(core, base, weights, variant, wf["tile"])
            parts = {"attn1": models.attn1_modules(base)}
            control = None
            if with_cnet:
                control = cnet[family]
                parts["controlnet"] = [control.control_model]
                if cnet_attention == "linfusion":       # the node's core function with its shipped source
                    control = core.controlnet.controlnet_patch.apply_linfusion_controlnet(control, weights)[0]
            # ComfyUI passes a ControlNet no per-call attention choice: its softmax attention (all of it, or
            # attn2 beside LinFusion) gets PyTorch SDPA, as the UNet has (on a GPU ComfyUI's default; on a
            # CPU its default is sub-quadratic, 2.4-3.7x slower here).
            undo = sdpa_everywhere() if with_cnet else (lambda: None)
            try:
                models.sample(model, family, 64, controlnet=control)   # warm-up
                with PartClock(device, parts) as clock:
                    row.update(measure(lambda: models.sample(model, family, w, controlnet=control, height=h),
                                       device, 1, warmup=False))
            finally:
                undo()
            row.update({f"{k}_s": v for k, v in clock.seconds.items()})
            if "tiled" in variant:      # per-tile state passes (compute_state / attend): no hook sees them
                row["attn1_s"] = None
            if (variant, with_cnet, cnet_attention) == plans[0]:
                latent = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
                decode = (lambda: core.tiling.tiled_vae.decode(vae, latent, tile_size=wf["vae_tile"] // div, park="cpu")) \
                    if wf["vae_tile"] else (lambda: vae.decode(latent))
                row["vae_s"] = measure(decode, device, 1, warmup=False)["median_s"]
            rows.append(row)
            done[same] = row
            log.info("[LinFusion] bench breakdown %s %s cnet=%s: %.2f s", wf["workflow"], variant, with_cnet,
                     row["median_s"])
    return rows

"""Peak memory of one high-res ladder stage at 8K / 16K, as workflow 2 runs it: one UNet evaluation
(a one-step sample, cond + uncond) of SD1.5 + LinFusion + Low-Memory Mode + Tiled UNet, then one pass of
the extension's tiled VAE decode. Not a full sampling: the peak of a stage is the peak of one step.
"""
from __future__ import annotations

import logging

import torch

from . import models
from .timing import measure

log = logging.getLogger("LinFusion")


def run(core, base, weights, vae, sizes: list[int], tile: int, vae_tile: int, budget, predict_step) -> list[dict]:
    device, rows = models.device(), []
    model = models.variant(core, base, weights, "linfusion+low-memory+tiled", tile)
    models.sample(model, "sd15", 128)
    for px in sizes:
        skip = budget.refuse(predict_step("sd15", px * px), 1)
        if skip:
            rows.append({"px": px, "part": "UNet step", **skip})
            continue
        rows.append({"px": px, "part": "UNet step", "tile": tile,
                     **measure(lambda: models.sample(model, "sd15", px), device, 1, warmup=False)})
        latent = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
        rows.append({"px": px, "part": "VAE decode (LinFusion tiled)", "tile": vae_tile,
                     **measure(lambda: core.tiling.tiled_vae.decode(vae, latent, tile_size=vae_tile, park="cpu"), device, 1,
                               warmup=False)})
        log.info("[LinFusion] bench ladder stage %d px: step %.1f s, VAE %.1f s", px, rows[-2]["median_s"],
                 rows[-1]["median_s"])
    return rows

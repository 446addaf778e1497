"""VAE decode three ways at growing image sizes: untiled `VAE.decode`, ComfyUI's `VAE.decode_tiled` (what
its VAE Decode (Tiled) node runs) and the extension's exact tiled decode (VAE Decode (LinFusion tiled)).
n(px) runs each; time, peak memory and the largest difference to the untiled image on the [0, 1] scale.
"""
from __future__ import annotations

import logging

import torch

from .timing import measure, predict

log = logging.getLogger("LinFusion")


def run(core, vae, sizes: list[int], tile: int, n, budget) -> list[dict]:
    device, rows, last = torch.device(vae.device), [], None
    overlap = tile // 4                                    # VAE Decode (Tiled)'s default ratio (512 / 64 ... 32)
    for px in sizes:
        skip = budget.refuse(predict(last, px * px, 1), 3 * n(px))
        if skip:
            rows += [{"px": px, "tile": tile, "variant": v, **skip} for v in ("untiled", "comfy_tiled", "ours")]
            continue
        latent = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(px))
        decodes = {"untiled": lambda: vae.decode(latent),
                   "comfy_tiled": lambda: vae.decode_tiled(latent, tile_x=tile // 8, tile_y=tile // 8,
                                                           overlap=overlap // 8),
                   "ours": lambda: core.tiling.tiled_vae.decode(vae, latent, tile_size=tile, park="cpu")}
        ref = None
        for name, fn in decodes.items():
            row = {"px": px, "tile": tile, "variant": name, **measure(fn, device, n(px), warmup=False, keep=True)}
            image = row.pop("output").float().cpu()
            ref = image if ref is None else ref
            row["max_err"] = (image - ref).abs().max().item()
            rows.append(row)
            log.info("[LinFusion] bench VAE decode %d px %s: %.2f s, max err %.2g", px, name, row["median_s"],
                     row["max_err"])
        last = (px * px, max(r["median_s"] for r in rows[-3:]))
    return rows

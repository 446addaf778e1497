"""How the ladder crosses between latent and pixel space, always exactly (never ComfyUI's blended tiles).

tile_size > 0: the exact tiled VAE (tiled_vae.py) at that tile. 0 (auto): the untiled VAE when ComfyUI's own
memory estimate fits in the free memory and the image is small enough that one decode is a short piece of
work (tiled_vae.UNTILED_MAX_PIXELS), else the exact tiled VAE at AUTO_TILE px. -1: the untiled VAE.
The untiled VAE runs one image at a time; an out-of-memory error there retries with the exact tiled VAE
(same result), and one in the tiled VAE halves the tile. Every pass is one unit of the running progress job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import progress
from ..tiling import tiled_vae
from .pixel_upscale import upscale_image

log = logging.getLogger("LinFusion")

AUTO, UNTILED = 0, -1
AUTO_TILE = 512        # px; the tiled VAE's working memory is ~6 kB x tile^2 (fp32, 128 channels)
MIN_TILE = 64


def resize_latent(samples: torch.Tensor, width: int, height: int, grid: int = 8) -> torch.Tensor:
    import comfy.utils

    return comfy.utils.common_upscale(samples, width // grid, height // grid, "bicubic", "disabled")


@dataclass
class VaeCodec:
    vae: object
    tile_size: int = AUTO                       # px; AUTO (0) or UNTILED (-1), see the module docstring
    upscale_model: object = None                # the pixel-space x2 step: None = bicubic (the paper's)
    park: str = "cpu"
    max_untiled_pixels: Optional[int] = None    # None: tiled_vae.UNTILED_MAX_PIXELS for the VAE's device
    passes: list = field(default_factory=list)  # (what, how) of every pass, for the log and the tests

    def _tile(self, shape, what: str) -> int:
        if self.tile_size != AUTO:
            return max(self.tile_size, 0)
        untiled = tiled_vae.prefer_untiled(self.vae, shape, what, self.max_untiled_pixels)
        return 0 if untiled else AUTO_TILE

    def _run(self, what: str, x: torch.Tensor, untiled, tiled):
        import comfy.model_management as mm

        tile = self._tile(x.shape, what)     # 0: untiled
        with progress.unit():
            bar = progress.NestedBar()
            while True:
                try:
                    if tile == 0:
                        out, how = untiled(bar), "untiled"
                    else:
                        out, note = tiled(tile, bar)
                        how = f"tiled {tile}" if note is None else "untiled (VAE not tileable)"
                    self.passes.append((what, how))
                    return out
                except mm.OOM_EXCEPTION:
                    if tile != 0 and tile // 2 < MIN_TILE:
                        raise
                # Retried outside the except block, so the failed attempt's tensors are freed first. Untiled
                # falls back to the exact tiled VAE (same result); tiled halves its tile.
                previous, tile = tile, AUTO_TILE if tile == 0 else tile // 2
                log.warning("[LinFusion] the %s VAE %s ran out of memory; using the exact tiled VAE with %d px tiles "
                            "(same result)", "untiled" if previous == 0 else f"{previous} px tiled", what, tile)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        images = self._run("decode", samples, lambda bar: tiled_vae.decode_untiled(self.vae, samples, bar),
                           lambda tile, bar: tiled_vae.decode_or_fallback(self.vae, samples, tile, self.park, bar,
                                                                          inexact_ok=False))
        return images.reshape((-1,) + tuple(images.shape[-3:]))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("encode", images, lambda bar: tiled_vae.encode_untiled(self.vae, images, bar),
                         lambda tile, bar: tiled_vae.encode_or_fallback(self.vae, images, tile, self.park, bar,
                                                                        inexact_ok=False))

    def to_stage(self, samples: torch.Tensor | None, width: int, height: int, latent_upscale: bool = False,
                 keep: Optional[list] = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The next stage's starting latent at width x height px: decode, x2 in pixel space (bicubic, or the
        upscale model then a resize to the exact size), encode; or, latent_upscale, a bicubic latent resize.
        pixels: the image itself instead of the decoded `samples` (a ladder started from an image resizes that
        image, as the paper's super-resolution pipeline does, not its VAE round trip).
        keep: a list that receives the decoded image of `samples` (the previous stage's result), or `pixels`."""
        if latent_upscale:
            if keep is not None:
                keep.append(self.decode(samples))
            return resize_latent(samples, width, height)
        image = self.decode(samples) if pixels is None else pixels
        if keep is not None:
            keep.append(image)
        with progress.unit(1 if self.upscale_model is not None else 0):
            big = upscale_image(image, width, height, self.upscale_model)
        del image
        return self.encode(big)

    def units(self, stages: int, latent_upscale: bool, keep_images: bool, encode_base: bool,
              from_pixels: bool = False) -> int:
        """Progress units of the crossings of a ladder of `stages` stages (a sampling step is one unit too).
        from_pixels: the first stage resizes a given image (no decode)."""
        if latent_upscale:
            per_stage = 1 if keep_images else 0
        else:
            per_stage = 2 + (1 if self.upscale_model is not None else 0)
        skipped = 1 if from_pixels and not latent_upscale else 0
        return stages * per_stage - skipped + (1 if keep_images else 0) + (1 if encode_base else 0)

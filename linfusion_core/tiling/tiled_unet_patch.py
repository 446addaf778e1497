"""Install the tiled UNet on a ModelPatcher clone as a DIFFUSION_MODEL wrapper.

The wrapper sits in ComfyUI's wrapper chain under its own key (other wrappers are kept, never overwritten)
and swaps only the innermost call, UNetModel._forward, for the tiled executor: wrappers added before or
after ours still run around it. Nothing on the model is modified, so removing the clone (or the key)
leaves the model exactly as it was, also after an interruption.
"""
from __future__ import annotations

import logging

import torch

from comfy.patcher_extension import WrapperExecutor, WrappersMP

from .tiled_unet import TiledUNetRunner, supports, unhandled_patches, warn_once

log = logging.getLogger("LinFusion")
WRAPPER_KEY = "linfusion_tiled_unet"
PARK_DEVICES = ("cpu", "accelerator")


class TiledUNetWrapper:
    """Callable DIFFUSION_MODEL wrapper; holds the settings and the fast mode's stale state."""

    def __init__(self, tile: int, park: str = "cpu", fast_stale_state: bool = False, progress: bool = True,
                 partition=None):
        """partition: a tiled_unet_distributed.Strips to split each call over the ranks of a process group
        (every rank runs the same sampler on the same inputs); None: this process alone."""
        if park not in PARK_DEVICES:
            raise ValueError(f"[LinFusion] park device must be one of {PARK_DEVICES}, got {park!r}")
        if tile < 2:
            raise ValueError(f"[LinFusion] tile size must be at least 2 latent pixels, got {tile}")
        if partition is not None and partition.distributed and fast_stale_state:
            raise ValueError("[LinFusion] the distributed tiled UNet runs the exact mode only")
        self.tile, self.park, self.progress, self.partition = int(tile), park, progress, partition
        self.stale_states = {} if fast_stale_state else None
        self.ticks_by_shape = {}

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        unet = executor.class_obj
        why = supports(unet) or (None if x.ndim == 4 else "only 2D latents can be tiled")
        if why is not None:
            log.warning("[LinFusion] tiled UNet skipped: %s", why)
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        unknown = unhandled_patches(transformer_options)
        if unknown:  # the exact untiled UNet: the rest of the chain, down to ComfyUI's own _forward
            warn_once(("patches", tuple(unknown)), "tiled UNet: the whole UNet call runs untiled (exact, not "
                      "memory-bounded): the tiled UNet does not implement the model patches %s", ", ".join(unknown))
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        park = torch.device("cpu") if self.park == "cpu" else x.device
        runner = TiledUNetRunner(unet, self.tile, park, x.device, self.stale_states, self.progress,
                                 self.expected_ticks(tuple(x.shape)), self.partition)
        # The rest of the chain runs as usual; only its innermost function is the tiled forward.
        rest = WrapperExecutor.new_class_executor(runner.forward, unet, executor.wrappers, executor.idx + 1)
        out = rest.execute(x, timesteps, context, y, control, transformer_options, **kwargs)
        self.ticks_by_shape[tuple(x.shape)] = runner.ticks
        part = self.partition
        if part is not None and part.distributed and part.call_in_prompt == 1:   # once per prompt: the split
            log.info("[LinFusion] distributed tiled UNet: rank %d of %d computed %d tile steps of UNet call 1 "
                     "(latent %s)", part.rank, part.world, runner.ticks, "x".join(map(str, x.shape)))
        return out

    def expected_ticks(self, shape):
        """Tile steps of this call, for the progress total: the last call's at this shape; at a new size (the
        ladder's next stage) the count at another size scaled by the area, a guess that only paces the bar."""
        if shape in self.ticks_by_shape:
            return self.ticks_by_shape[shape]
        for known, ticks in self.ticks_by_shape.items():
            if known[:2] == shape[:2]:
                return max(1, round(ticks * shape[2] * shape[3] / (known[2] * known[3])))
        return None


def launcher_partition():
    """The partition over the ranks of the launcher's session (scripts/comfy_host.py serve --gpus N); an error
    naming the launcher without it (distributed_session.require)."""
    from .distributed_session import require
    from .tiled_unet_distributed import Strips
    return Strips() if require("Tiled UNet", "the UNet").world > 1 else None


def apply_tiled_unet(model, tile: int, park: str = "cpu", fast_stale_state: bool = False, progress: bool = True,
                     partition=None, distributed: bool = False):
    """A clone of `model` (ModelPatcher) whose UNet evaluations run tile by tile (split over the ranks of a
    process group with a tiled_unet_distributed.Strips partition; distributed=True: the launcher's ranks)."""
    if distributed and partition is None:
        partition = launcher_partition()
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)  # re-applying replaces our own only
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                           TiledUNetWrapper(tile, park, fast_stale_state, progress, partition))
    return m

"""Low-memory UNet evaluation (LINFUSION_FACTS.md section 4D): same results, smaller peak memory.

Four independent pieces, each installed through a ComfyUI hook by LowMemoryOptions.apply (nothing global):
- cond and uncond (and every other batched chunk) through the UNet one at a time: an APPLY_MODEL wrapper
  that splits the batch ComfyUI's calc_cond_batch assembled (it batches them whenever memory "fits");
- feed-forward layers over token chunks: an object patch replacing each BasicTransformerBlock.ff by a
  module sharing the same `net` (so weight keys, LoRA patches and lowvram casting are unchanged);
- in-place SiLU after the GroupNorms of the ResBlocks (the norm output is a fresh tensor nobody else holds);
- UNet skip connections parked in CPU memory between the down and the up path (input/output block patches).
Linear attention's own token chunk size is passed to the LinFusion attention through transformer_options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .patch import LINEAR_ATTENTION_CHUNK_KEY

log = logging.getLogger("LinFusion")

WRAPPER_KEY = "linfusion_low_memory"
_PARK_FLAG = "linfusion_park_skips"
_PARKED_DEVICE_COPY = "linfusion_parked_h"


class ChunkedFeedForward(torch.nn.Module):
    """FeedForward over token chunks: the 4x (GEGLU: 8x) wide hidden activation exists for one chunk at a
    time. Tokens are independent in a feed-forward, so the result equals the unchunked one."""

    def __init__(self, feed_forward: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.net = feed_forward.net  # the same module: state-dict keys stay "...ff.net.*"
        self.chunk_tokens = int(chunk_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.chunk_tokens <= 0 or n <= self.chunk_tokens:
            return self.net(x)
        out = None
        for start in range(0, n, self.chunk_tokens):
            y = self.net(x[:, start:start + self.chunk_tokens])
            if out is None:
                out = y.new_empty(x.shape[:-1] + y.shape[-1:])
            out[:, start:start + y.shape[1]] = y
            del y
        return out


def _slice_batch(value, sl: slice, batch: int):
    """The part of a conditioning value that belongs to batch rows `sl` (non-batched values pass through)."""
    if torch.is_tensor(value):
        return value[sl] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, list):
        return [_slice_batch(v, sl, batch) for v in value]
    if isinstance(value, dict):
        return {k: _slice_batch(v, sl, batch) for k, v in value.items()}
    return value


class SequentialCondWrapper:
    """APPLY_MODEL wrapper: the chunks of a cond/uncond batch go through the model one after the other.
    Every batched input (x, sigma, context, adm, ControlNet residuals, ...) is sliced alike and
    transformer_options["cond_or_uncond"] is narrowed, so patches that look at it still see the truth."""

    def __init__(self, sequential: bool = True, park_skips: bool = False):
        self.sequential = sequential
        self.park_skips = park_skips

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        options = transformer_options.copy()
        # ControlNet adds to the skip tensors on the compute device before output_block_patch sees them:
        # parking them would make ComfyUI drop the control (it catches the device mismatch with a warning).
        has_output_control = control is not None and any(c is not None for c in control.get("output", []))
        options[_PARK_FLAG] = self.park_skips and not has_output_control
        chunks = list(options.get("cond_or_uncond", []))
        batch = x.shape[0]
        if not self.sequential or len(chunks) <= 1 or batch % len(chunks):
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        per = batch // len(chunks)
        outs = []
        for i in range(len(chunks)):
            sl = slice(i * per, (i + 1) * per)
            part = options.copy()
            part["cond_or_uncond"] = chunks[i:i + 1]
            if len(options.get("uuids", [])) == len(chunks):
                part["uuids"] = options["uuids"][i:i + 1]
            args = [_slice_batch(v, sl, batch) for v in (x, t, c_concat, c_crossattn, control)]
            extra = {k: _slice_batch(v, sl, batch) for k, v in kwargs.items()}
            outs.append(executor(*args, part, **extra))
        return torch.cat(outs)


class SkipParking:
    """input_block_patch / input_block_patch_after_skip / output_block_patch trio that keeps the UNet's skip
    tensors in `park_device` memory while the rest of the UNet runs. The block output is appended to the skip
    list as a parked copy; the device copy goes on to the next block without a round trip."""

    def __init__(self, park_device):
        self.park_device = torch.device(park_device)

    def _active(self, h, transformer_options) -> bool:
        return transformer_options.get(_PARK_FLAG, False) and h.device != self.park_device

    def park(self, h, transformer_options):
        if not self._active(h, transformer_options):
            return h
        parked = h.to(self.park_device)
        transformer_options[_PARKED_DEVICE_COPY] = (parked, h)
        return parked

    def resume(self, h, transformer_options):
        parked, device_copy = transformer_options.pop(_PARKED_DEVICE_COPY, (None, None))
        if parked is not None and h is parked:
            return device_copy
        return h  # another patch replaced h after ours (or nothing was parked): leave its result alone

    def unpark(self, h, hsp, transformer_options):
        if hsp.device != h.device:
            hsp = hsp.to(h.device)
        return h, hsp


@dataclass(frozen=True)
class LowMemoryOptions:
    sequential_cond: bool = True
    ff_chunk_tokens: int = 16384     # 0: feed-forward unchunked
    inplace_silu: bool = True
    park_skips: bool = False
    attention_chunk_tokens: int = 0  # 0: LinFusion attention's default

    def apply(self, model_patcher):
        """A clone of the ModelPatcher with the low-memory patches; the input patcher is not modified."""
        import comfy.ldm.modules.attention as attention
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
        import comfy.model_management
        import comfy.patcher_extension

        m = model_patcher.clone()
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               SequentialCondWrapper(self.sequential_cond, self.park_skips))
        unet = m.get_model_object("diffusion_model")
        # The model may still carry the object patches of the last clone ComfyUI loaded (its own or ours):
        # match our replacements too, and never decide from their current in-place flag.
        feed_forwards = (attention.FeedForward, ChunkedFeedForward)
        for name, module in unet.named_modules():
            if self.ff_chunk_tokens > 0 and isinstance(getattr(module, "ff", None), feed_forwards):
                m.add_object_patch(f"diffusion_model.{name}.ff", ChunkedFeedForward(module.ff, self.ff_chunk_tokens))
            if self.inplace_silu and isinstance(module, openaimodel.ResBlock):
                for seq in ("in_layers", "out_layers"):
                    layers = getattr(module, seq, None)
                    if isinstance(layers, torch.nn.Sequential) and len(layers) > 1 and \
                            type(layers[1]) is torch.nn.SiLU:
                        m.add_object_patch(f"diffusion_model.{name}.{seq}.1", torch.nn.SiLU(inplace=True))
        if self.park_skips:
            parking = SkipParking(comfy.model_management.unet_offload_device())
            m.set_model_input_block_patch(parking.park)
            m.set_model_input_block_patch_after_skip(parking.resume)
            m.set_model_output_block_patch(parking.unpark)
        if self.attention_chunk_tokens > 0:
            m.model_options["transformer_options"][LINEAR_ATTENTION_CHUNK_KEY] = int(self.attention_chunk_tokens)
        return m

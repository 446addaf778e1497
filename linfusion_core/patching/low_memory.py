"""Low-memory UNet evaluation (LINFUSION_FACTS.md section 4D): same results, smaller peak memory.

Five independent pieces, each installed through a ComfyUI hook by LowMemoryOptions.apply (nothing global):
- cond and uncond (and every other batched chunk) through the UNet one at a time: an APPLY_MODEL wrapper
  that splits the batch ComfyUI's calc_cond_batch assembled (it batches them whenever memory "fits");
- feed-forward layers in pieces: an object patch replacing each BasicTransformerBlock.ff by a module sharing
  the same `net` (so weight keys, LoRA patches and lowvram casting are unchanged). The paper's form is a
  number of chunks (the official notebooks call set_chunk_feed_forward(16, 1) with a chunking redefined to
  mean 16 pieces of the token axis, whatever its length); a fixed number of tokens per piece is the other
  choice (diffusers' own meaning of the chunk size);
- in-place SiLU after the GroupNorms of the ResBlocks (the norm output is a fresh tensor nobody else holds);
- UNet skip connections parked in CPU memory between the down and the up path (input/output block patches);
  on by default: parking only acts when the UNet computes on another device than ComfyUI's offload device;
- the models sampling does not need (text encoders, VAE) unloaded from the UNet's device before the UNet is
  loaded: a PREPARE_SAMPLING wrapper asks ComfyUI's model management (free_memory) to unload every loaded
  model on that device except the UNet, its clones and the models loaded with it; they load back when used.
Linear attention's own token chunk size is passed to the LinFusion attention through transformer_options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..dynamic_vram import is_dynamic
from .patch import LINEAR_ATTENTION_CHUNK_KEY

log = logging.getLogger("LinFusion")

WRAPPER_KEY = "linfusion_low_memory"
_PARK_FLAG = "linfusion_park_skips"
_PARKED_DEVICE_COPY = "linfusion_parked_h"


FF_CHUNKING = ("chunks", "tokens", "off")
PAPER_FF_CHUNKS = 16


class ChunkedFeedForward(torch.nn.Module):
    """FeedForward in pieces of the token axis: the 4x (GEGLU: 8x) wide hidden activation exists for one
    piece at a time. Tokens are independent in a feed-forward, so the result equals the unchunked one.

    chunks > 0: that many pieces of ceil(N / chunks) tokens (the paper's form); otherwise chunk_tokens tokens
    per piece (0: unchunked)."""

    def __init__(self, feed_forward: torch.nn.Module, chunk_tokens: int = 0, chunks: int = 0):
        super().__init__()
        self.net = feed_forward.net  # the same module: state-dict keys stay "...ff.net.*"
        self.chunk_tokens = int(chunk_tokens)
        self.chunks = int(chunks)

    def piece_tokens(self, n: int) -> int:
        if self.chunks > 0:
            return -(-n // self.chunks)
        return self.chunk_tokens if self.chunk_tokens > 0 else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        size = self.piece_tokens(n)
        if size >= n:
            return self.net(x)
        out = None
        for start in range(0, n, size):
            y = self.net(x[:, start:start + size])
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


class OffloadOtherModels:
    """PREPARE_SAMPLING wrapper: before ComfyUI loads the UNet for sampling, unload the other models on its
    device (the text encoders that made the conditioning, the VAE that made the latent) through ComfyUI's
    own model management. Nothing is unloaded when the UNet runs on the CPU (nothing to gain there)."""

    def __call__(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        import comfy.model_management
        import comfy.sampler_helpers

        device = model.load_device
        if not comfy.model_management.is_device_cpu(device):
            # What prepare_sampling is about to load (ControlNets, hooks' models, LinFusion's modules) stays.
            needed = comfy.sampler_helpers.get_additional_models(conds, model.model_dtype())[0]
            needed += comfy.sampler_helpers.get_additional_models_from_model_options(model_options)
            unload_models_besides([model] + model.get_nested_additional_models() + needed, device)
        return executor(model, noise_shape, conds, model_options=model_options, **kwargs)


def unload_models_besides(keep, device) -> list:
    """Unload, with comfy.model_management.free_memory, every model loaded on `device` except `keep` (model
    patchers), their clones (same weights: keeping them spares a reload) and the models they carry.
    Returns the patchers that were unloaded."""
    import comfy.model_management as mm

    def kept(patcher) -> bool:
        return any(patcher is k or patcher.is_clone(k) for k in keep)

    keep_loaded = [lm for lm in mm.current_loaded_models if lm.model is not None and kept(lm.model)]
    # More than any device holds: free_memory unloads every model outside keep_loaded on this device. Under
    # 0.33's DynamicVRAM (the UNet and what it carries are dynamic patchers) ask as its own loader then asks,
    # for_dynamic: dynamic models are not force-unloaded but give way on demand, weight by weight; a
    # non-dynamic request would also make ComfyUI enforce its pinned-memory budget for them.
    dynamic = {"for_dynamic": True} if keep and all(is_dynamic(p) for p in keep) else {}
    unloaded = mm.free_memory(float("inf"), device, keep_loaded=keep_loaded, **dynamic)
    models = [lm.model for lm in unloaded if lm.model is not None]
    if models:
        log.info("[LinFusion] low-memory mode: unloaded %s from %s before loading the UNet",
                 ", ".join(type(m.model).__name__ for m in models), device)
    return models


@dataclass(frozen=True)
class LowMemoryOptions:
    sequential_cond: bool = True
    ff_chunking: str = "chunks"      # "chunks": ff_chunks pieces (paper); "tokens": ff_chunk_tokens per piece; "off"
    ff_chunks: int = PAPER_FF_CHUNKS
    ff_chunk_tokens: int = 16384     # with ff_chunking "tokens" (0: unchunked)
    inplace_silu: bool = True
    park_skips: bool = True
    attention_chunk_tokens: int = 0  # 0: LinFusion attention's default
    offload_other_models: bool = True

    def feed_forward_pieces(self) -> dict | None:
        """ChunkedFeedForward's arguments, or None for an unchunked feed-forward."""
        if self.ff_chunking not in FF_CHUNKING:
            raise ValueError(f"ff_chunking must be one of {FF_CHUNKING}, got {self.ff_chunking!r}")
        if self.ff_chunking == "chunks" and self.ff_chunks > 1:
            return {"chunks": self.ff_chunks}
        if self.ff_chunking == "tokens" and self.ff_chunk_tokens > 0:
            return {"chunk_tokens": self.ff_chunk_tokens}
        return None

    def apply(self, model_patcher):
        """A clone of the ModelPatcher with the low-memory patches; the input patcher is not modified."""
        import comfy.ldm.modules.attention as attention
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
        import comfy.model_management
        import comfy.patcher_extension

        pieces = self.feed_forward_pieces()
        m = model_patcher.clone()
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               SequentialCondWrapper(self.sequential_cond, self.park_skips))
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY)
        if self.offload_other_models:
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                                   OffloadOtherModels())
        unet = m.get_model_object("diffusion_model")
        # The model may still carry the object patches of the last clone ComfyUI loaded (its own or ours):
        # match our replacements too, and never decide from their current in-place flag.
        feed_forwards = (attention.FeedForward, ChunkedFeedForward)
        for name, module in unet.named_modules():
            if pieces and isinstance(getattr(module, "ff", None), feed_forwards):
                m.add_object_patch(f"diffusion_model.{name}.ff", ChunkedFeedForward(module.ff, **pieces))
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

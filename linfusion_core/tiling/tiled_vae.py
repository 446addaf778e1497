"""Exact tiled VAE decode/encode for ComfyUI's AutoencoderKL (SD1.x, SD2.x, SDXL and its relatives).

"Exact" means the result equals the untiled `first_stage_model.decode/encode` up to float rounding:
the network is run layer by layer (tiled_vae_passes.py) with whole-image GroupNorm statistics, exact
convolution halos and the mid-block attention over all pixels. Only latent-sized work (post_quant_conv,
quant_conv, the regulariser) runs untiled, through the model's own modules.

For other VAE architectures, or an AutoencoderKL with a layer the passes do not tile exactly (a swapped
convolution, say), `unsupported_reason(vae)` names it before any work is done. The fallbacks then use the
untiled VAE when it fits (exact, decoded one image at a time so a cancel acts between images); only the
standalone nodes, and only when the untiled VAE would not fit, use ComfyUI's own (inexact) tiled path.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..dynamic_vram import is_dynamic
from .tiled_vae_passes import Parked, TiledPasses, downsample_conv_problem, same_conv_problem

log = logging.getLogger("LinFusion")

PARK_DEVICES = ("cpu", "accelerator")


def unsupported_reason(vae) -> Optional[str]:
    """None when the exact tiled path handles this comfy.sd.VAE, else a short reason."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from comfy.ldm.modules.diffusionmodules import model as sd_vae

    model = getattr(vae, "first_stage_model", None)
    if model is None:
        return "the VAE is empty (the checkpoint has no VAE weights)"
    if not isinstance(model, AutoencodingEngine):
        return f"{type(model).__name__} is not an AutoencoderKL"
    if getattr(vae, "latent_dim", 2) != 2:
        return "video/3D latents"
    enc, dec = model.encoder, model.decoder
    if type(enc) is not sd_vae.Encoder or type(dec) is not sd_vae.Decoder:
        return f"{type(enc).__name__}/{type(dec).__name__} are not the SD Encoder/Decoder"
    if getattr(dec, "give_pre_end", False):
        return "decoder returns pre-end features"
    for net in (enc, dec):
        if not isinstance(net.conv_in, torch.nn.Conv2d) or not isinstance(net.conv_out, torch.nn.Conv2d):
            return "3D (video) convolutions"
        for module in net.modules():
            if isinstance(module, sd_vae.ResnetBlock) and type(module) is not sd_vae.ResnetBlock:
                return f"custom resnet block {type(module).__name__}"
            if isinstance(module, sd_vae.Upsample) and (not module.with_conv
                                                          or getattr(module, "scale_factor", 2.0) not in (2.0, (2.0, 2.0))):
                return "an upsample layer other than nearest x2 + conv"
            if isinstance(module, sd_vae.Downsample) and (not module.with_conv or module.conv.stride != (2, 2)):
                return "a downsample layer other than a stride-2 conv"
        if type(net.mid.attn_1) is not sd_vae.AttnBlock:
            return f"mid-block attention {type(net.mid.attn_1).__name__}"
    return _unsupported_layer(enc, "encoder") or _unsupported_layer(dec, "decoder")


def _unsupported_layer(net, prefix: str) -> Optional[str]:
    """The first layer the passes would not compute exactly, named by its module path."""
    for name, module in net.named_modules():
        where = f"{prefix}.{name}"
        if isinstance(module, torch.nn.Conv2d):
            downsample = name.endswith("downsample.conv")
            problem = downsample_conv_problem(module) if downsample else same_conv_problem(module)
            if problem is not None:
                return f"layer {where}: {problem}"
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            return f"layer {where}: {type(module).__name__}"
        elif name.rsplit(".", 1)[-1] in ("norm", "norm1", "norm2", "norm_out") \
                and not isinstance(module, torch.nn.GroupNorm):
            return f"layer {where}: {type(module).__name__} is not a GroupNorm"
    return None


def _passes(vae, tile_size: int, park: str, on_tile, dry: bool, partition=None) -> TiledPasses:
    import comfy.model_management as mm

    if park not in PARK_DEVICES:
        raise ValueError(f"park device must be one of {PARK_DEVICES}, got {park!r}")
    park_device = vae.device if park == "accelerator" else torch.device("cpu")
    decoder = vae.first_stage_model.decoder
    return TiledPasses(device=vae.device, park_device=park_device, dtype=vae.vae_dtype, tile_size=int(tile_size),
                       ref_channels=decoder.ch, on_tile=on_tile,
                       check_interrupt=None if dry else mm.throw_exception_if_processing_interrupted, dry=dry,
                       partition=partition)


# -- walks of ComfyUI's Decoder / Encoder (mirror their forward(), module by module) -----------------
def _walk_decoder(p: TiledPasses, dec, z: Parked, out_device) -> Parked:
    h = p.conv(z, dec.conv_in)
    h = p.resnet_block(h, dec.mid.block_1)
    h = p.attention_block(h, dec.mid.attn_1)
    h = p.resnet_block(h, dec.mid.block_2)
    for i_level in reversed(range(dec.num_resolutions)):
        level = dec.up[i_level]
        for i_block in range(dec.num_res_blocks + 1):
            h = p.resnet_block(h, level.block[i_block])
            if len(level.attn) > 0:
                h = p.attention_block(h, level.attn[i_block])
        if i_level != 0:
            h = p.upsample(h, level.upsample)
    return p.conv(h, dec.conv_out, norm=dec.norm_out, silu=True, with_stats=False, park_device=out_device)


def _walk_encoder(p: TiledPasses, enc, x: Parked) -> Parked:
    h = p.conv(x, enc.conv_in)
    for i_level in range(enc.num_resolutions):
        level = enc.down[i_level]
        for i_block in range(enc.num_res_blocks):
            h = p.resnet_block(h, level.block[i_block])
            if len(level.attn) > 0:
                h = p.attention_block(h, level.attn[i_block])
        if i_level != enc.num_resolutions - 1:
            h = p.downsample(h, level.downsample)
    h = p.resnet_block(h, enc.mid.block_1)
    h = p.attention_block(h, enc.mid.attn_1)
    h = p.resnet_block(h, enc.mid.block_2)
    return p.conv(h, enc.conv_out, norm=enc.norm_out, silu=True, with_stats=False, park_device=p.device)


# -- the latent-sized ends, as AutoencodingEngine(Legacy).decode/encode do them ----------------------
def _decoder_input(model, z: torch.Tensor) -> torch.Tensor:
    import comfy.model_management as mm
    from einops import rearrange

    if getattr(model, "bn", None) is not None:     # Flux2-style batch-norm latent
        s = torch.sqrt(mm.cast_to(model.bn.running_var.view(1, -1, 1, 1), dtype=z.dtype, device=z.device) + model.bn_eps)
        m = mm.cast_to(model.bn.running_mean.view(1, -1, 1, 1), dtype=z.dtype, device=z.device)
        z = rearrange(z * s + m, "... (c pi pj) i j -> ... c (i pi) (j pj)", pi=model.ps[0], pj=model.ps[1])
    if getattr(model, "post_quant_conv", None) is not None:
        z = model.post_quant_conv(z)
    return z


def _encoder_output(model, z: torch.Tensor) -> torch.Tensor:
    import comfy.model_management as mm
    from einops import rearrange

    if getattr(model, "quant_conv", None) is not None:
        z = model.quant_conv(z)
    z, _ = model.regularization(z)
    if getattr(model, "bn", None) is not None:
        z = rearrange(z, "... c (i pi) (j pj) -> ... (c pi pj) i j", pi=model.ps[0], pj=model.ps[1])
        z = torch.nn.functional.batch_norm(z, mm.cast_to(model.bn.running_mean, dtype=z.dtype, device=z.device),
                                           mm.cast_to(model.bn.running_var, dtype=z.dtype, device=z.device),
                                           momentum=model.bn_momentum, eps=model.bn_eps)
    return z


# -- public API ------------------------------------------------------------------------------------
def _count_tiles(vae, tile_size, park, walk) -> int:
    p = _passes(vae, tile_size, park, None, dry=True)
    walk(p)
    return p.tile_count


def _load(vae, working_bytes: int) -> None:
    import comfy.model_management as mm
    # As VAE.decode does: let ComfyUI's model management put the VAE on its device (or partly, low-VRAM).
    mm.load_models_gpu([vae.patcher], memory_required=working_bytes, force_full_load=vae.disable_offload)


def _tile_working_bytes(vae, tile_size: int) -> int:
    # A few activation tiles (input window, fp32 normalised copy, conv output), each ~ tile^2 x 128 ch.
    return 12 * tile_size * tile_size * vae.first_stage_model.decoder.ch * 4


@torch.no_grad()
def decode_raw(vae, samples: torch.Tensor, tile_size: int = 512, park: str = "cpu",
               on_progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The decoder's output (B x 3 x H x W, float, roughly [-1, 1]) as `first_stage_model.decode` gives
    it, computed tile by tile. `samples` is the latent ComfyUI passes to VAE.decode."""
    reason = unsupported_reason(vae)
    if reason is not None:
        raise NotImplementedError(f"exact tiled VAE does not handle this VAE: {reason}")
    model = vae.first_stage_model
    out_device = vae.output_device
    extra = vae.memory_used_decode(samples.shape, vae.vae_dtype) if park == "accelerator" else 0
    _load(vae, _tile_working_bytes(vae, tile_size) + extra)
    per_sample = None
    outputs = []
    done = [0]
    for i in range(samples.shape[0]):
        z = _decoder_input(model, samples[i:i + 1].to(vae.device, vae.vae_dtype))
        walk = lambda p, z=z: _walk_decoder(p, model.decoder, p.park(z, with_stats=False) if not p.dry
                                            else Parked(tuple(z.shape[1:])), out_device)
        if per_sample is None:
            per_sample = _count_tiles(vae, tile_size, park, walk)
            total = per_sample * samples.shape[0]

        def tick():
            done[0] += 1
            if on_progress is not None:
                on_progress(done[0], total)
        out = walk(_passes(vae, tile_size, park, tick, dry=False)).tensor
        if model.decoder.tanh_out:
            out = torch.tanh(out)
        outputs.append(out.float())
    return torch.cat(outputs, dim=0)


@torch.no_grad()
def encode_raw(vae, pixels: torch.Tensor, tile_size: int = 512, park: str = "cpu",
               on_progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The latent `first_stage_model.encode` gives (the posterior mode) for B x 3 x H x W pixels already
    mapped by vae.process_input, computed tile by tile."""
    reason = unsupported_reason(vae)
    if reason is not None:
        raise NotImplementedError(f"exact tiled VAE does not handle this VAE: {reason}")
    model = vae.first_stage_model
    extra = vae.memory_used_encode(pixels.shape, vae.vae_dtype) if park == "accelerator" else 0
    _load(vae, _tile_working_bytes(vae, tile_size) + extra)
    total = None
    outputs = []
    done = [0]
    for i in range(pixels.shape[0]):
        x = pixels[i:i + 1]
        walk = lambda p, x=x: _walk_encoder(p, model.encoder, Parked(tuple(x.shape[1:])) if p.dry
                                            else Parked(tuple(x.shape[1:]), x.to(vae.vae_dtype)))
        if total is None:
            total = _count_tiles(vae, tile_size, park, walk) * pixels.shape[0]

        def tick():
            done[0] += 1
            if on_progress is not None:
                on_progress(done[0], total)
        z = walk(_passes(vae, tile_size, park, tick, dry=False)).tensor
        outputs.append(_encoder_output(model, z).to(vae.output_device).float())
    return torch.cat(outputs, dim=0)


def decode(vae, samples: torch.Tensor, tile_size: int = 512, park: str = "cpu", on_progress=None) -> torch.Tensor:
    """Like VAE.decode: an IMAGE (B x H x W x 3 in [0, 1])."""
    vae.throw_exception_if_invalid()
    raw = decode_raw(vae, samples, tile_size, park, on_progress)
    return vae.process_output(raw).to(vae.output_device).movedim(1, -1)


def encode(vae, pixels: torch.Tensor, tile_size: int = 512, park: str = "cpu", on_progress=None) -> torch.Tensor:
    """Like VAE.encode: a latent from an IMAGE (B x H x W x C in [0, 1]), cropped to the VAE's multiple."""
    vae.throw_exception_if_invalid()
    pixels = vae.vae_encode_crop_pixels(pixels)[..., :3].movedim(-1, 1)
    return encode_raw(vae, vae.process_input(pixels), tile_size, park, on_progress)


# -- the untiled VAE: exact, one image at a time, and never ComfyUI's inexact tiled retry ---------------
# Above this many pixels the automatic choice tiles even when the untiled VAE fits, so a cancel acts
# within one tile's time rather than one whole decode's.
UNTILED_MAX_PIXELS = {"cpu": 1024 * 1024, "accelerator": 2048 * 2048}


def untiled_memory(vae, shape, what: str) -> int:
    """ComfyUI's own estimate (VAE.memory_used_decode / _encode) for ONE image: `shape` is the latent's for a
    decode, the IMAGE's (B x H x W x C) for an encode."""
    if what == "decode":
        return int(vae.memory_used_decode((1,) + tuple(shape[1:]), vae.vae_dtype))
    return int(vae.memory_used_encode((1, 3) + tuple(shape[1:3]), vae.vae_dtype))


def available_memory(vae) -> int:
    """Free memory on the VAE's device, plus what ComfyUI frees by unloading other models there (not on the
    CPU, where unloading frees no RAM)."""
    import comfy.model_management as mm

    # 0.33 asks the patcher (under DynamicVRAM it adds what comfy-aimdo's virtual weights can give back);
    # older ComfyUI has only model_management's figure.
    patcher_free = getattr(vae.patcher, "get_free_memory", None)
    free = patcher_free(vae.device) if patcher_free is not None else mm.get_free_memory(vae.device)
    if not mm.is_device_cpu(vae.device):
        for loaded in list(mm.current_loaded_models):
            model = loaded.model   # a weak reference: None once its patcher is gone
            # A dynamic model's memory is in the patcher's figure already (aimdo gives it back on demand).
            if (model is not None and loaded.device == vae.device and model is not vae.patcher
                    and not is_dynamic(model)):
                free += model.loaded_size()
    return int(free)


def image_pixels(vae, shape, what: str) -> int:
    if what == "decode":
        return int(shape[-2] * shape[-1] * vae.spacial_compression_decode() ** 2)
    return int(shape[1] * shape[2])


def choose_untiled(need_bytes: int, free_bytes: int, pixels: int, max_pixels: int) -> bool:
    """The automatic choice: the untiled VAE when it fits in memory and the image is small enough that one
    decode is a short, uncancellable piece of work; otherwise the exact tiled VAE."""
    return need_bytes <= free_bytes and pixels <= max_pixels


def prefer_untiled(vae, shape, what: str, max_pixels: Optional[int] = None) -> bool:
    import comfy.model_management as mm

    if max_pixels is None:
        max_pixels = UNTILED_MAX_PIXELS["cpu" if mm.is_device_cpu(vae.device) else "accelerator"]
    return choose_untiled(untiled_memory(vae, shape, what), available_memory(vae), image_pixels(vae, shape, what),
                          max_pixels)


@torch.no_grad()
def decode_untiled(vae, samples: torch.Tensor, on_progress=None) -> torch.Tensor:
    """VAE.decode's computation, one image at a time with a cancel check between them; an out-of-memory
    error propagates (VAE.decode would retry with ComfyUI's inexact tiles: the caller chooses instead)."""
    import comfy.model_management as mm

    vae.throw_exception_if_invalid()
    if samples.ndim != 4:                     # video latents: ComfyUI's own decode
        return vae.decode(samples)
    mm.load_models_gpu([vae.patcher], memory_required=untiled_memory(vae, samples.shape, "decode"),
                       force_full_load=vae.disable_offload)
    images = []
    for i in range(samples.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        z = samples[i:i + 1].to(vae.vae_dtype).to(vae.device)
        images.append(vae.process_output(vae.first_stage_model.decode(z).to(vae.output_device).float()))
        if on_progress is not None:
            on_progress(i + 1, samples.shape[0])
    return torch.cat(images, dim=0).movedim(1, -1)


@torch.no_grad()
def encode_untiled(vae, pixels: torch.Tensor, on_progress=None) -> torch.Tensor:
    """VAE.encode's computation for an IMAGE, one image at a time (see decode_untiled)."""
    import comfy.model_management as mm

    vae.throw_exception_if_invalid()
    if getattr(vae, "latent_dim", 2) != 2:
        return vae.encode(pixels[..., :3])
    pixels = vae.vae_encode_crop_pixels(pixels)[..., :3]
    mm.load_models_gpu([vae.patcher], memory_required=untiled_memory(vae, pixels.shape, "encode"),
                       force_full_load=vae.disable_offload)
    latents = []
    for i in range(pixels.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        x = vae.process_input(pixels[i:i + 1].movedim(-1, 1)).to(vae.vae_dtype).to(vae.device)
        latents.append(vae.first_stage_model.encode(x).to(vae.output_device).float())
        if on_progress is not None:
            on_progress(i + 1, pixels.shape[0])
    return torch.cat(latents, dim=0)


# -- what the nodes and the ladder call: exact tiled, else exact untiled, else (nodes only) ComfyUI's tiles --
def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def _fallback(vae, what: str, shape, reason: str, untiled, comfy_tiled, inexact_ok: bool):
    import comfy.model_management as mm

    need, free = untiled_memory(vae, shape, what), available_memory(vae)
    if need <= free:
        note = (f"[LinFusion] exact tiled {what} does not handle this VAE ({reason}); ran the untiled VAE "
                f"instead (exact; it fits: ~{_gib(need)} of {_gib(free)} free).")
        log.warning(note)
        out_of_memory = False
        try:
            return untiled(), note
        except mm.OOM_EXCEPTION:
            out_of_memory = True          # handled outside the except block, so the failed tensors are freed
        if out_of_memory and not inexact_ok:
            raise RuntimeError(f"[LinFusion] the untiled VAE {what} ran out of memory, and the exact tiled {what} "
                               f"does not handle this VAE ({reason}). Use an SD1.x / SD2.x / SDXL VAE "
                               f"(AutoencoderKL) or a smaller image.")
    elif not inexact_ok:
        raise RuntimeError(f"[LinFusion] exact tiled {what} does not handle this VAE ({reason}), and the untiled "
                           f"{what} would need ~{_gib(need)} with {_gib(free)} free. Use an SD1.x / SD2.x / SDXL "
                           f"VAE (AutoencoderKL), a smaller target size, or decode the final latent with ComfyUI's "
                           f"'VAE Decode (Tiled)' (inexact) instead.")
    note = (f"[LinFusion] exact tiled {what} does not handle this VAE ({reason}) and the untiled {what} does not "
            f"fit; used ComfyUI's own tiled {what} instead (blended tiles, not exact).")
    log.warning(note)
    return comfy_tiled(), note


def decode_or_fallback(vae, samples: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None,
                       inexact_ok: bool = True):
    """(IMAGE, note): the exact tiled decode (note None); for a VAE it does not handle, the untiled decode
    when it fits, else ComfyUI's own tiled decode (only if inexact_ok, else a clear error), with a note."""
    reason = unsupported_reason(vae) or (None if samples.ndim == 4 else "video/3D latents")
    if reason is None:
        return decode(vae, samples, tile_size, park, on_progress), None

    def comfy_tiled():
        tile = max(8, tile_size // vae.spacial_compression_decode())
        images = vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 4)
        if images.ndim == 5:   # video VAEs: frames into the batch, as VAEDecodeTiled does
            images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
        return images
    return _fallback(vae, "decode", samples.shape, reason, lambda: decode_untiled(vae, samples, on_progress),
                     comfy_tiled, inexact_ok)


def encode_or_fallback(vae, pixels: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None,
                       inexact_ok: bool = True):
    """(latent, note): the exact tiled encode, or as decode_or_fallback for a VAE it does not handle."""
    reason = unsupported_reason(vae)
    if reason is None:
        return encode(vae, pixels, tile_size, park, on_progress), None
    return _fallback(vae, "encode", pixels.shape, reason, lambda: encode_untiled(vae, pixels, on_progress),
                     lambda: vae.encode_tiled(pixels[:, :, :, :3], tile_x=tile_size, tile_y=tile_size,
                                              overlap=tile_size // 8), inexact_ok)

"""Exact tiled VAE decode/encode for ComfyUI's AutoencoderKL (SD1.x, SD2.x, SDXL and its relatives).

"Exact" means the result equals the untiled `first_stage_model.decode/encode` up to float rounding:
the network is run layer by layer (tiled_vae_passes.py) with whole-image GroupNorm statistics, exact
convolution halos and the mid-block attention over all pixels. Only latent-sized work (post_quant_conv,
quant_conv, the regulariser) runs untiled, through the model's own modules.

For other VAE architectures `unsupported_reason(vae)` says why, and the nodes fall back to ComfyUI's
own tiled path.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .tiled_vae_passes import Parked, TiledPasses

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
    return None


def _passes(vae, tile_size: int, park: str, on_tile, dry: bool) -> TiledPasses:
    import comfy.model_management as mm

    if park not in PARK_DEVICES:
        raise ValueError(f"park device must be one of {PARK_DEVICES}, got {park!r}")
    park_device = vae.device if park == "accelerator" else torch.device("cpu")
    decoder = vae.first_stage_model.decoder
    return TiledPasses(device=vae.device, park_device=park_device, dtype=vae.vae_dtype, tile_size=int(tile_size),
                       ref_channels=decoder.ch, on_tile=on_tile,
                       check_interrupt=None if dry else mm.throw_exception_if_processing_interrupted, dry=dry)


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


def _fallback_note(vae, what: str) -> str:
    note = (f"[LinFusion] exact tiled {what} does not handle this VAE ({unsupported_reason(vae)}); "
            f"used ComfyUI's own tiled {what} instead (blended tiles, not exact).")
    log.warning(note)
    return note


def decode_or_fallback(vae, samples: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None):
    """(IMAGE, note): the exact tiled decode, or for VAEs it does not handle ComfyUI's own tiled decode and a
    note saying so (None when exact)."""
    if unsupported_reason(vae) is None and samples.ndim == 4:
        return decode(vae, samples, tile_size, park, on_progress), None
    note = _fallback_note(vae, "decode")
    tile = max(8, tile_size // vae.spacial_compression_decode())
    images = vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 4)
    if images.ndim == 5:   # video VAEs: frames into the batch, as VAEDecodeTiled does
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return images, note


def encode_or_fallback(vae, pixels: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None):
    """(latent, note): the exact tiled encode, or ComfyUI's own tiled encode and a note for other VAEs."""
    if unsupported_reason(vae) is None:
        return encode(vae, pixels, tile_size, park, on_progress), None
    note = _fallback_note(vae, "encode")
    return vae.encode_tiled(pixels[:, :, :, :3], tile_x=tile_size, tile_y=tile_size, overlap=tile_size // 8), note

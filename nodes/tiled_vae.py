"""VAE Decode / Encode (LinFusion tiled): tiled, yet equal to the untiled VAE up to float rounding.

The work is in linfusion_core/tiled_vae.py; these nodes wire it to ComfyUI (progress bar, fallback).
VAEs the exact path does not handle (video, Flux-style 16-channel...) go through ComfyUI's own tiled
decode/encode, and the node says so in the log and the UI output.
"""
import logging

import comfy.utils

from ..linfusion_core import tiled_vae

log = logging.getLogger("LinFusion")

TILE_TOOLTIP = ("Tile side in pixels at full resolution (layers with more channels use proportionally "
                "fewer pixels, so every tile holds about the same memory). Smaller = less accelerator "
                "memory, more passes. The result does not depend on it beyond float rounding.")
PARK_TOOLTIP = ("Where the whole-image activations between layers wait: 'cpu' keeps accelerator memory "
                "bounded by the tile size (activations go to RAM: about 3 x 128 channels x H x W values); "
                "'accelerator' is faster when they fit.")


def _progress_bar():
    bar = comfy.utils.ProgressBar(1)
    return lambda done, total: bar.update_absolute(done, total)


def _fallback_note(vae, what: str) -> str:
    reason = tiled_vae.unsupported_reason(vae)
    note = (f"[LinFusion] exact tiled {what} does not handle this VAE ({reason}); "
            f"used ComfyUI's own tiled {what} instead (blended tiles, not exact).")
    log.warning(note)
    return note


class LinFusionVAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode."}),
            "vae": ("VAE", {"tooltip": "An SD1.x / SD2.x / SDXL VAE (AutoencoderKL); others fall back to "
                                       "ComfyUI's tiled decode."}),
            "tile_size": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16, "tooltip": TILE_TOOLTIP}),
            "park_device": (list(tiled_vae.PARK_DEVICES), {"default": "cpu", "tooltip": PARK_TOOLTIP}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image, equal to VAE Decode's up to float rounding (no seams).",)
    FUNCTION = "decode"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Decodes a latent tile by tile with whole-image GroupNorm statistics, exact convolution "
                   "borders and full-image attention: seamless by construction, memory bounded by the tile.")

    def decode(self, samples, vae, tile_size, park_device):
        latent = samples["samples"]
        if tiled_vae.unsupported_reason(vae) is None and latent.ndim == 4:
            return (tiled_vae.decode(vae, latent, tile_size, park_device, _progress_bar()),)
        note = _fallback_note(vae, "decode")
        compression = vae.spacial_compression_decode()
        tile = max(8, tile_size // compression)
        images = vae.decode_tiled(latent, tile_x=tile, tile_y=tile, overlap=tile // 4)
        if images.ndim == 5:   # video VAEs: frames into the batch, as VAEDecodeTiled does
            images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
        return {"ui": {"text": [note]}, "result": (images,)}


class LinFusionVAEEncodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to encode (cropped to a multiple of the VAE's factor, "
                                            "as VAE Encode does)."}),
            "vae": ("VAE", {"tooltip": "An SD1.x / SD2.x / SDXL VAE (AutoencoderKL); others fall back to "
                                       "ComfyUI's tiled encode."}),
            "tile_size": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16, "tooltip": TILE_TOOLTIP}),
            "park_device": (list(tiled_vae.PARK_DEVICES), {"default": "cpu", "tooltip": PARK_TOOLTIP}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent, equal to VAE Encode's up to float rounding.",)
    FUNCTION = "encode"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Encodes an image tile by tile with whole-image GroupNorm statistics, exact convolution "
                   "borders and full-image attention: same latent as VAE Encode, memory bounded by the tile.")

    def encode(self, pixels, vae, tile_size, park_device):
        if tiled_vae.unsupported_reason(vae) is None:
            return ({"samples": tiled_vae.encode(vae, pixels, tile_size, park_device, _progress_bar())},)
        note = _fallback_note(vae, "encode")
        latent = vae.encode_tiled(pixels[:, :, :, :3], tile_x=tile_size, tile_y=tile_size, overlap=tile_size // 8)
        return {"ui": {"text": [note]}, "result": ({"samples": latent},)}


NODE_CLASS_MAPPINGS = {
    "LinFusionVAEDecodeTiled": LinFusionVAEDecodeTiled,
    "LinFusionVAEEncodeTiled": LinFusionVAEEncodeTiled,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LinFusionVAEDecodeTiled": "VAE Decode (LinFusion tiled)",
    "LinFusionVAEEncodeTiled": "VAE Encode (LinFusion tiled)",
}

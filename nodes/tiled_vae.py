"""VAE Decode / Encode (LinFusion tiled): tiled, yet equal to the untiled VAE up to float rounding.

The work is in linfusion_core/tiling/tiled_vae.py; these nodes wire it to ComfyUI (progress bar, fallback).
For a VAE the exact path does not handle (TAESD, video VAEs, a layer it cannot tile) the node runs the
untiled VAE when it fits (still exact), and only otherwise ComfyUI's own tiled decode/encode (inexact); either
way it says so, naming the reason, in the log and the UI output. The optional `distributed` switch splits the
exact tiled path over the ranks of a launcher session (linfusion_core/tiling/tiled_vae_distributed.py).
"""
from ..linfusion_core import progress
from ..linfusion_core.tiling import tiled_vae, tiled_vae_distributed

TILE_TOOLTIP = ("Tile side in pixels at full resolution (layers with more channels use proportionally "
                "fewer pixels, so every tile holds about the same memory). Smaller = less accelerator "
                "memory, more passes. The result does not depend on it beyond float rounding.")
DISTRIBUTED_TOOLTIP = (
    "Split the {what} over the GPUs (ranks) of a launcher session: start ComfyUI with `python3 "
    "scripts/comfy_host.py serve --gpus N`. Each rank computes a strip of rows; the result is the single-process "
    "{result}, bitwise. A VAE the exact path does not handle runs untiled on every rank (the node says so). "
    "Without the launcher: an error.")
PARK_TOOLTIP = ("Where the whole-image activations between layers wait: 'cpu' keeps accelerator memory "
                "bounded by the tile size (activations go to RAM: about 3 x 128 channels x H x W values); "
                "'accelerator' is faster when they fit.")


class LinFusionVAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode."}),
            "vae": ("VAE", {"tooltip": "An SD1.x / SD2.x / SDXL VAE (AutoencoderKL). Others run untiled "
                                       "when that fits, else through ComfyUI's tiled decode (inexact); the "
                                       "node says so."}),
            "tile_size": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16, "tooltip": TILE_TOOLTIP}),
            "park_device": (list(tiled_vae.PARK_DEVICES), {"default": "cpu", "tooltip": PARK_TOOLTIP}),
        }, "optional": {   # optional, default off: workflows and API prompts saved before it load unchanged
            "distributed": ("BOOLEAN", {"default": False, "tooltip": DISTRIBUTED_TOOLTIP.format(
                what="decode", result="image")}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image, equal to VAE Decode's up to float rounding (no seams).",)
    FUNCTION = "decode"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Decodes a latent tile by tile with whole-image GroupNorm statistics, exact convolution "
                   "borders and full-image attention: seamless by construction, memory bounded by the tile.")

    def decode(self, samples, vae, tile_size, park_device, distributed=False):
        images, note = tiled_vae_distributed.decode_or_fallback(vae, samples["samples"], tile_size, park_device,
                                                                progress.NestedBar(), distributed)
        return (images,) if note is None else {"ui": {"text": [note]}, "result": (images,)}


class LinFusionVAEEncodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to encode (cropped to a multiple of the VAE's factor, "
                                            "as VAE Encode does)."}),
            "vae": ("VAE", {"tooltip": "An SD1.x / SD2.x / SDXL VAE (AutoencoderKL). Others run untiled "
                                       "when that fits, else through ComfyUI's tiled encode (inexact); the "
                                       "node says so."}),
            "tile_size": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16, "tooltip": TILE_TOOLTIP}),
            "park_device": (list(tiled_vae.PARK_DEVICES), {"default": "cpu", "tooltip": PARK_TOOLTIP}),
        }, "optional": {
            "distributed": ("BOOLEAN", {"default": False, "tooltip": DISTRIBUTED_TOOLTIP.format(
                what="encode", result="latent")}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent, equal to VAE Encode's up to float rounding.",)
    FUNCTION = "encode"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Encodes an image tile by tile with whole-image GroupNorm statistics, exact convolution "
                   "borders and full-image attention: same latent as VAE Encode, memory bounded by the tile.")

    def encode(self, pixels, vae, tile_size, park_device, distributed=False):
        latent, note = tiled_vae_distributed.encode_or_fallback(vae, pixels, tile_size, park_device,
                                                                progress.NestedBar(), distributed)
        result = ({"samples": latent},)
        return result if note is None else {"ui": {"text": [note]}, "result": result}


NODE_CLASS_MAPPINGS = {
    "LinFusionVAEDecodeTiled": LinFusionVAEDecodeTiled,
    "LinFusionVAEEncodeTiled": LinFusionVAEEncodeTiled,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LinFusionVAEDecodeTiled": "VAE Decode (LinFusion tiled)",
    "LinFusionVAEEncodeTiled": "VAE Encode (LinFusion tiled)",
}

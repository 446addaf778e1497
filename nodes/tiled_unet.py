"""LinFusion Tiled UNet: every UNet evaluation runs spatially tile by tile, equal to the untiled UNet."""
from ..linfusion_core.tiling.tiled_unet_patch import PARK_DEVICES, apply_tiled_unet


class LinFusionTiledUNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A LinFusion-patched SD1.x/SD2.x/SDXL model (Apply LinFusion first)."}),
            "tile_size": ("INT", {"default": 64, "min": 8, "max": 1024, "step": 8, "tooltip":
                "Tile edge in latent pixels (x8 in image pixels) at full resolution; deeper UNet levels use the "
                "same tiles scaled down. Smaller tiles: less peak memory on the accelerator, more overhead."}),
            "park_device": (list(PARK_DEVICES), {"default": "cpu", "tooltip":
                "Where full-size activations (block outputs, skip connections) wait between layers. 'cpu' bounds "
                "accelerator memory by the tile size; 'accelerator' is faster when they fit."}),
            "mode": (["exact", "fast (one-step-stale attention state)"], {"default": "exact", "tooltip":
                "exact: GroupNorm statistics and the LinFusion attention state are gathered over the whole "
                "image before use; output equals the untiled UNet up to rounding. fast: self-attention uses "
                "the global state of the previous sampling step (as DistriFusion does), saving one pass over "
                "each attention layer; the output is no longer exactly the untiled one (the first step of "
                "each run is exact)."}),
        }, "optional": {
            "distributed": ("BOOLEAN", {"default": False, "tooltip":
                "Split every UNet call over the GPUs (ranks) of a launcher session: start ComfyUI with "
                "`python3 scripts/comfy_host.py serve --gpus N`. Each rank computes a strip of rows; the result "
                "is the single-process image, bitwise. Exact mode only. Without the launcher: an error."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with tiled UNet evaluation; the input model is unchanged.",)
    FUNCTION = "patch"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Runs every UNet evaluation tile by tile with exact global context: GroupNorm statistics over "
                   "the whole map, LinFusion's additive attention state over all tiles, convolution halos from "
                   "the full previous activation. Softmax self-attention (blocks without LinFusion) cannot be "
                   "tiled exactly and runs untiled.")

    def patch(self, model, tile_size, park_device, mode, distributed=False):
        return (apply_tiled_unet(model, tile_size, park_device, fast_stale_state=mode.startswith("fast"),
                                 distributed=distributed),)


NODE_CLASS_MAPPINGS = {"LinFusionTiledUNet": LinFusionTiledUNet}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionTiledUNet": "LinFusion Tiled UNet"}

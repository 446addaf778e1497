"""LinFusion Low-Memory Mode: a MODEL patch that lowers peak memory without changing results
(engine: linfusion_core.low_memory)."""
from ..linfusion_core.low_memory import LowMemoryOptions


class LinFusionLowMemory:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (with or without LinFusion applied)."}),
                "sequential_cond": ("BOOLEAN", {"default": True, "tooltip": "Run cond and uncond through the UNet "
                                                                            "one at a time instead of as one batch."}),
                "ff_chunk_tokens": ("INT", {"default": 16384, "min": 0, "max": 1 << 24, "step": 1024,
                                            "tooltip": "Feed-forward layers process this many tokens at a time "
                                                       "(0: all at once)."}),
                "inplace_silu": ("BOOLEAN", {"default": True, "tooltip": "In-place SiLU after the ResNet norms."}),
                "park_skips": ("BOOLEAN", {"default": False,
                                           "tooltip": "Keep the UNet skip connections in CPU memory between the down "
                                                      "and up path (saves GPU memory, costs transfers). Skipped for "
                                                      "calls with ControlNet residuals."}),
                "attention_chunk_tokens": ("INT", {"default": 0, "min": 0, "max": 1 << 24, "step": 1024,
                                                   "tooltip": "Token chunk size of LinFusion's linear attention "
                                                              "(0: its default). No effect without LinFusion."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model with lower peak memory; results match the unpatched model.",)
    FUNCTION = "patch"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = "Lower the UNet's peak memory for very large images (paper's 16K-in-24GB recipe); same results."

    def patch(self, model, sequential_cond, ff_chunk_tokens, inplace_silu, park_skips, attention_chunk_tokens):
        options = LowMemoryOptions(sequential_cond=sequential_cond, ff_chunk_tokens=ff_chunk_tokens,
                                   inplace_silu=inplace_silu, park_skips=park_skips,
                                   attention_chunk_tokens=attention_chunk_tokens)
        return (options.apply(model),)


NODE_CLASS_MAPPINGS = {"LinFusionLowMemory": LinFusionLowMemory}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionLowMemory": "LinFusion Low-Memory Mode"}

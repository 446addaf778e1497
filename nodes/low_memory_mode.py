"""LinFusion Low-Memory Mode: a MODEL patch that lowers peak memory without changing results
(engine: linfusion_core.patching.low_memory)."""
from ..linfusion_core.patching.low_memory import FF_CHUNKING, PAPER_FF_CHUNKS, LowMemoryOptions


class LinFusionLowMemory:
    # New inputs go last: saved workflows fill widgets by position, so older files keep their values.
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (with or without LinFusion applied)."}),
                "sequential_cond": ("BOOLEAN", {"default": True, "tooltip": "Run cond and uncond through the UNet "
                                                                            "one at a time instead of as one batch."}),
                "ff_chunk_tokens": ("INT", {"default": 16384, "min": 0, "max": 1 << 24, "step": 1024,
                                            "tooltip": "With ff_chunking 'tokens': the feed-forward layers process "
                                                       "this many tokens at a time (0: all at once)."}),
                "inplace_silu": ("BOOLEAN", {"default": True, "tooltip": "In-place SiLU after the ResNet norms."}),
                "park_skips": ("BOOLEAN", {"default": True,
                                           "tooltip": "Keep the UNet skip connections in CPU memory between the down "
                                                      "and up path (saves GPU memory, costs transfers; the paper's "
                                                      "recipe). Acts only when the UNet runs on a GPU; skipped for "
                                                      "calls with ControlNet residuals."}),
                "attention_chunk_tokens": ("INT", {"default": 0, "min": 0, "max": 1 << 24, "step": 1024,
                                                   "tooltip": "Token chunk size of LinFusion's linear attention "
                                                              "(0: its default). No effect without LinFusion."}),
            },
            # Added after the first release: optional, so API-format prompts saved before them still run.
            "optional": {
                "ff_chunking": (list(FF_CHUNKING), {
                    "default": FF_CHUNKING[0],
                    "tooltip": "How the feed-forward layers are split: 'chunks' into ff_chunks pieces whatever the "
                               "size (the paper: 16), 'tokens' into pieces of ff_chunk_tokens tokens, 'off' not "
                               "at all."}),
                "ff_chunks": ("INT", {"default": PAPER_FF_CHUNKS, "min": 1, "max": 4096,
                                      "tooltip": "With ff_chunking 'chunks': the number of pieces (paper: 16)."}),
                "offload_other_models": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Before the UNet is loaded for sampling, unload the models it does not need "
                               "(text encoders, VAE) from its GPU through ComfyUI's model management; they load "
                               "back when next used. No effect when the UNet runs on the CPU."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model with lower peak memory; results match the unpatched model.",)
    FUNCTION = "patch"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = "Lower the UNet's peak memory for very large images (paper's 16K-in-24GB recipe); same results."

    def patch(self, model, sequential_cond, ff_chunk_tokens, inplace_silu, park_skips, attention_chunk_tokens,
              ff_chunking=FF_CHUNKING[0], ff_chunks=PAPER_FF_CHUNKS, offload_other_models=True):
        options = LowMemoryOptions(sequential_cond=sequential_cond, ff_chunking=ff_chunking, ff_chunks=ff_chunks,
                                   ff_chunk_tokens=ff_chunk_tokens, inplace_silu=inplace_silu, park_skips=park_skips,
                                   attention_chunk_tokens=attention_chunk_tokens,
                                   offload_other_models=offload_other_models)
        return (options.apply(model),)


NODE_CLASS_MAPPINGS = {"LinFusionLowMemory": LinFusionLowMemory}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionLowMemory": "LinFusion Low-Memory Mode"}

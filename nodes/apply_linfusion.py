"""Apply LinFusion: a MODEL whose self-attention (attn1) runs LinFusion's linear attention.

The patch lives in a clone (ComfyUI injections + an additional model for the weights), so the input MODEL
and its other clones stay untouched, and removing the node gives back exactly the original model.
"""
from ..linfusion_core.patching.patch import AUTO, BLOCK_CHOICES, apply_linfusion

MIN_TOKENS_MODES = ("manual", AUTO)


class ApplyLinFusion:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x, SD 2.x or SDXL model (finetunes and merges included)."}),
            "linfusion": ("LINFUSION", {"tooltip": "LinFusion weights from Load LinFusion, made for this model family."}),
            "blocks": (list(BLOCK_CHOICES), {
                "default": BLOCK_CHOICES[0],
                "tooltip": "Which self-attention blocks get LinFusion: all of them (as in the paper), or only "
                           "the highest-resolution level, where softmax attention costs the most."}),
            "min_tokens": ("INT", {
                "default": 0, "min": 0, "max": 1 << 24, "step": 64,
                "tooltip": "Hybrid mode: a block with fewer tokens than this (latent h*w at that level) keeps "
                           "the model's own softmax attention, so native sizes stay exactly SD. 0 = LinFusion "
                           "everywhere. Example: 4096 keeps softmax at the 64x64 latent level of a 512px SD1.5. "
                           "Ignored when min_tokens_mode is auto."}),
        }, "optional": {
            # Optional, so API prompts and workflows saved before it existed stay valid (they get "manual").
            "min_tokens_mode": (list(MIN_TOKENS_MODES), {
                "default": MIN_TOKENS_MODES[0],
                "tooltip": "manual: the min_tokens above. auto: per level, the model's own softmax where it is "
                           "measured faster on this device and dtype (small token counts: low resolutions, a "
                           "ladder's base stage), LinFusion elsewhere; measured once per width (a fraction of a "
                           "second, cached) and named in info. Softmax is the attention the LinFusion modules were "
                           "distilled from, so those levels give the base model's own result."}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The model with LinFusion attention.",
                       "Model family found (or ASSUMED from the model, for a renamed SD 1.x/2.x file without "
                       "config) and how many modules were patched.")
    FUNCTION = "apply"
    CATEGORY = "LinFusion"
    DESCRIPTION = ("Replaces the UNet's self-attention with LinFusion linear attention: cost grows linearly with "
                   "image area, enabling 4K-16K generation. LoRA deltas on self-attention are not used by the "
                   "LinFusion modules (they run their own distilled weights); the rest of a LoRA applies.")

    def apply(self, model, linfusion, blocks, min_tokens, min_tokens_mode="manual"):
        return apply_linfusion(model, linfusion, blocks=blocks,
                               min_tokens=AUTO if min_tokens_mode == AUTO else min_tokens)


NODE_CLASS_MAPPINGS = {"ApplyLinFusion": ApplyLinFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"ApplyLinFusion": "Apply LinFusion"}

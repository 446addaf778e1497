"""Load LinFusion: weights from models/linfusion (hub folder, or one .safetensors with or without config);
the released sets are offered too and downloaded when the prompt runs if they are not on disk."""
from ..linfusion_core.weights.checkpoint import load_linfusion
from .model_folder import linfusion_path, list_linfusion_choices, validate_linfusion_choice


class LinFusionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "linfusion_name": (list_linfusion_choices(), {
                "tooltip": "LinFusion weights in models/linfusion: a hub folder (config.json + "
                           "diffusion_pytorch_model.safetensors) or a single .safetensors. Use "
                           "LinFusion-1-5 for SD 1.x, LinFusion-2-1 for SD 2.x, LinFusion-XL for SDXL: these "
                           "three are always listed, and one not on disk is fetched from Hugging Face "
                           "(Yuanshi/<name>) into models/linfusion/<name>/ the first time a prompt uses it."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, linfusion_name):
        return validate_linfusion_choice(linfusion_name)

    RETURN_TYPES = ("LINFUSION", "STRING")
    RETURN_NAMES = ("linfusion", "info")
    OUTPUT_TOOLTIPS = ("The LinFusion weights, for Apply LinFusion.",
                       "What was loaded: module count, channel widths, model family, where the config came from.")
    FUNCTION = "load"
    CATEGORY = "LinFusion"
    DESCRIPTION = "Loads LinFusion linear-attention weights (arXiv 2409.02097) for Apply LinFusion."

    def load(self, linfusion_name):
        weights = load_linfusion(linfusion_path(linfusion_name), display_name=linfusion_name)
        return (weights, weights.describe())


NODE_CLASS_MAPPINGS = {"LinFusionLoader": LinFusionLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionLoader": "Load LinFusion"}

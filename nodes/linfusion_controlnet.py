"""LinFusion ControlNet: a CONTROL_NET whose own self-attention runs LinFusion's linear attention.

At high resolution a ControlNet's softmax self-attention costs as much as the UNet's did before LinFusion;
this patches a copy (the input ControlNet and its other copies stay untouched) with either the base model's
matching LinFusion modules or modules distilled for this ControlNet (saved and reused).
"""
import os

import folder_paths

from ..linfusion_core.controlnet.controlnet_distill import DEFAULT_STEPS, SUBFOLDER, linfusion_controlnet
from ..linfusion_core.controlnet.controlnet_patch import SOURCES
from .model_folder import FOLDER_NAME


class LinFusionControlNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net": ("CONTROL_NET", {"tooltip": "An SD 1.x, SD 2.x or SDXL ControlNet (or ControlLoRA) from "
                                                       "Load ControlNet Model. T2I-Adapters pass through unchanged."}),
            "linfusion": ("LINFUSION", {"tooltip": "The LinFusion weights of the base model family (the same ones "
                                                   "Apply LinFusion uses)."}),
            "source": (list(SOURCES), {
                "default": SOURCES[0],
                "tooltip": "base modules: the base model's LinFusion modules for the blocks the ControlNet mirrors "
                           "(immediate). distilled for this ControlNet: fit each module to this ControlNet's own "
                           "attention at native resolution first (minutes on a GPU; saved in models/linfusion/"
                           f"{SUBFOLDER}/ and reused next time)."}),
            "distill_steps": ("INT", {
                "default": DEFAULT_STEPS, "min": 1, "max": 10000, "step": 10,
                "tooltip": "Optimisation steps per attention layer when distilling (ignored for base modules). "
                           "More steps: closer to the ControlNet's softmax attention, longer fit."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The hint image you give Apply ControlNet (needed for distilling)."}),
            "conditioning": ("CONDITIONING", {"tooltip": "Your positive prompt, used while distilling (a random "
                                                         "prompt embedding is used when absent)."}),
            "name": ("STRING", {"default": "", "tooltip": "Name of the distilled file, e.g. the ControlNet's file "
                                                          "name; a hash of the ControlNet's weights is appended."}),
        }}

    RETURN_TYPES = ("CONTROL_NET", "STRING")
    RETURN_NAMES = ("control_net", "info")
    OUTPUT_TOOLTIPS = ("The ControlNet with LinFusion self-attention, for Apply ControlNet.",
                       "What was patched, with which modules, and the distillation's error figures.")
    FUNCTION = "apply"
    CATEGORY = "LinFusion"
    DESCRIPTION = ("Runs the ControlNet's self-attention with LinFusion linear attention, so a high-resolution "
                   "ControlNet keeps LinFusion's speed. Use it between Load ControlNet Model and Apply ControlNet.")

    def apply(self, control_net, linfusion, source, distill_steps, image=None, conditioning=None, name=""):
        folder = os.path.join(folder_paths.get_folder_paths(FOLDER_NAME)[0], SUBFOLDER)
        return linfusion_controlnet(control_net, linfusion, source, distill_steps, image, conditioning, name, folder)


NODE_CLASS_MAPPINGS = {"LinFusionControlNet": LinFusionControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionControlNet": "LinFusion ControlNet"}

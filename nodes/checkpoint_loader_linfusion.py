"""Load Checkpoint + LinFusion: one node that loads an SD checkpoint and applies the LinFusion weights that
fit it (picked automatically from models/linfusion by model family and module layout, or named). When none
on disk fit, the released set for the checkpoint's family is downloaded."""
import logging

import comfy.sd
import folder_paths

from ..linfusion_core.weights.checkpoint import LinFusionLoadError, load_linfusion, peek_linfusion
from ..linfusion_core.patching.patch import apply_linfusion
from ..linfusion_core.weights.hub_download import release_for_family
from ..linfusion_core.patching.placement import model_family, model_label, place_modules
from .model_folder import (linfusion_path, list_linfusion_choices, list_linfusion_entries, release_not_on_disk,
                           resolve_linfusion_entry, validate_linfusion_choice)

log = logging.getLogger("LinFusion")
AUTO = "auto (match the checkpoint)"


def pick_linfusion(base_model) -> str:
    """The first listed LinFusion entry whose modules fit this model (files with a config first); when none
    fits, the released set for the model's family, if it is not on disk yet (it is downloaded on load)."""
    fits, reasons = [], []
    for name in list_linfusion_entries():
        try:
            weights = peek_linfusion(resolve_linfusion_entry(name), display_name=name)
            place_modules(weights, base_model)
        except (LinFusionLoadError, OSError) as e:
            reasons.append(f"  {name}: {str(e)[:160]}")
            continue
        fits.append((weights.config_source == "weights only", name))
    release = release_for_family(model_family(base_model))
    if not fits and release is not None and release_not_on_disk(release):
        return release
    if not fits:
        raise LinFusionLoadError(f"no LinFusion weights in models/linfusion fit this {model_label(base_model)} "
                                 f"checkpoint; download the matching LinFusion release. Checked:\n" + "\n".join(reasons))
    return min(fits)[1]


class CheckpointLoaderLinFusion:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {
                "tooltip": "An SD 1.x, SD 2.x or SDXL checkpoint (finetunes and merges included)."}),
            "linfusion_name": ([AUTO] + list_linfusion_choices(), {
                "tooltip": "LinFusion weights from models/linfusion; 'auto' picks the ones that fit the checkpoint, "
                           "and downloads the released set for its family (Yuanshi/LinFusion-1-5, -2-1, -XL) when "
                           "none on disk fit. A released set not on disk is fetched when the prompt runs."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, linfusion_name):
        return linfusion_name == AUTO or validate_linfusion_choice(linfusion_name)

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("model", "clip", "vae", "info")
    OUTPUT_TOOLTIPS = ("The diffusion model with LinFusion attention.", "The text encoder.", "The VAE.",
                       "Which LinFusion weights were applied, and to how many modules.")
    FUNCTION = "load"
    CATEGORY = "LinFusion"
    DESCRIPTION = "Loads a checkpoint and applies LinFusion (all blocks) in one step."

    def load(self, ckpt_name, linfusion_name):
        ckpt_path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            ckpt_path, output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        if linfusion_name == AUTO:
            linfusion_name = pick_linfusion(model.model)
            log.info("[LinFusion] %s: picked %s", ckpt_name, linfusion_name)
        weights = load_linfusion(linfusion_path(linfusion_name), display_name=linfusion_name)
        patched, info = apply_linfusion(model, weights)
        return (patched, clip, vae, info)


NODE_CLASS_MAPPINGS = {"CheckpointLoaderLinFusion": CheckpointLoaderLinFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"CheckpointLoaderLinFusion": "Load Checkpoint + LinFusion"}

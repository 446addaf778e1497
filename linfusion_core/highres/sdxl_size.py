"""SDXL size conditioning of the high-res stages (LINFUSION_FACTS.md section 4B).

SDXL embeds (original height, width, crop, target height, width) into its `y` input. The paper's high-res
pipeline conditions the base and every stage on the FINAL image size (original_size = target_size = final
size); its super-resolution pipeline on the stage's own size. ComfyUI reads these from the conditioning
keys width/height/target_width/target_height (what CLIPTextEncodeSDXL writes; comfy.model_base.SDXL.encode_adm)
and, where they are missing, uses the size of the latent being sampled. Other model families are left alone.
"""
from __future__ import annotations

SIZE_FINAL = "final size (paper)"
SIZE_STAGE = "stage size"
SIZE_AS_GIVEN = "as given"
SIZE_CONDITIONINGS = (SIZE_FINAL, SIZE_STAGE, SIZE_AS_GIVEN)


def uses_size_conditioning(base_model) -> bool:
    """SDXL and its distilled relatives (SSD-1B, Vega) share comfy.model_base.SDXL and its encode_adm."""
    import comfy.model_base

    return isinstance(base_model, comfy.model_base.SDXL)


def with_size(conditioning, width: int, height: int):
    """A copy of the conditioning with SDXL's original and target size set to width x height (crop kept)."""
    values = {"width": int(width), "height": int(height), "target_width": int(width), "target_height": int(height)}
    return [[t, {**options, **values}] for t, options in conditioning]


def stage_conditioning(base_model, conditioning, mode: str, stage_size: tuple[int, int],
                       final_size: tuple[int, int]):
    """The conditioning one stage samples with under `mode` (one of SIZE_CONDITIONINGS)."""
    if mode not in SIZE_CONDITIONINGS:
        raise ValueError(f"size conditioning must be one of {SIZE_CONDITIONINGS}, got {mode!r}")
    if mode == SIZE_AS_GIVEN or not uses_size_conditioning(base_model):
        return conditioning
    return with_size(conditioning, *(final_size if mode == SIZE_FINAL else stage_size))

"""The ladder's x2 step in pixel space: bicubic (the paper's), or an upscale model (ESRGAN family, as ComfyUI's
`Load Upscale Model` gives it) whose output is resized to the exact stage size."""
from __future__ import annotations

import torch

from .. import progress


def resize_image(images: torch.Tensor, width: int, height: int, method: str = "bicubic") -> torch.Tensor:
    """Resize B x H x W x C images in [0, 1] to exactly width x height (bicubic overshoots: clamp back)."""
    import comfy.utils

    out = comfy.utils.common_upscale(images.movedim(-1, 1), width, height, method, "disabled")
    return out.movedim(1, -1).clamp(0.0, 1.0)


def run_upscale_model(upscale_model, images: torch.Tensor, tile: int = 512, overlap: int = 32) -> torch.Tensor:
    """ComfyUI's `Upscale Image (using Model)` (comfy_extras/nodes_upscale_model.py) run from inside the ladder:
    its memory estimate, its tiling (comfy.utils.tiled_scale) and its halving of the tile on out-of-memory,
    but the tiles move the ladder's one bar (and are where a cancel lands) instead of a bar of their own."""
    import comfy.model_management as mm
    import comfy.utils

    # ComfyUI's estimate: ~384 activations per pixel of a 512 px tile at the model's scale, the input (and the
    # model itself where ComfyUI does not count it).
    need = (images.nelement() * images.element_size()
            + 512 * 512 * 3 * images.element_size() * max(upscale_model.scale, 1.0) * 384.0)
    patcher = getattr(upscale_model, "patcher", None)
    if patcher is not None:
        # ComfyUI 0.33 loads the model through its patcher, as any model it manages (DynamicVRAM included).
        device = patcher.load_device
        mm.load_models_gpu([patcher], memory_required=need, force_full_load=True)
    else:
        device = mm.get_torch_device()
        mm.free_memory(need + mm.module_size(upscale_model.model), device)
        upscale_model.to(device)
    try:
        x = images.movedim(-1, -3).to(device)
        while True:
            try:
                steps = x.shape[0] * comfy.utils.get_tiled_scale_steps(x.shape[3], x.shape[2], tile_x=tile,
                                                                       tile_y=tile, overlap=overlap)
                out = comfy.utils.tiled_scale(x, lambda a: upscale_model(a), tile_x=tile, tile_y=tile,
                                              overlap=overlap, upscale_amount=upscale_model.scale,
                                              pbar=progress.NestedBar(steps))
                break
            except mm.OOM_EXCEPTION:
                tile //= 2
                if tile < 128:
                    raise
    finally:
        if patcher is None:
            upscale_model.to("cpu")
    return out.movedim(-3, -1).clamp(0.0, 1.0)


def upscale_image(images: torch.Tensor, width: int, height: int, upscale_model=None) -> torch.Tensor:
    """images at exactly width x height: bicubic, or the upscale model at its own scale and then a resize to
    the stage size (area averaging when shrinking, e.g. a x4 model on a x2 stage; bicubic when growing)."""
    if upscale_model is None:
        return resize_image(images, width, height)
    big = run_upscale_model(upscale_model, images)
    if tuple(big.shape[1:3]) == (height, width):
        return big
    shrink = big.shape[1] >= height and big.shape[2] >= width
    return resize_image(big, width, height, "area" if shrink else "bicubic")

"""Full-size SD1.5 / SDXL UNets in ComfyUI's own classes, with random weights, wrapped as a MODEL.

The configs are the ones ComfyUI's model detection produces for the real checkpoints
(comfy.model_detection.unet_config_from_diffusers_unet); building through the detected model config
gives the same BaseModel / SDXL class, model sampling and operations a loaded checkpoint gets.
"""
from __future__ import annotations

import torch

from .random_weights import fill_variance_preserving

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FAMILIES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}    # for memory checks before building


def build_model_patcher(family: str, device: torch.device, dtype=torch.float32, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of the real architecture with variance-preserving random weights."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    unet_config = dict(FAMILIES[family], dtype=dtype)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {family} UNet config")
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    fill_variance_preserving(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def conditioning(family: str, seed: int = 0):
    """Positive and negative CONDITIONING (ComfyUI's list format) of the right text width."""
    gen = torch.Generator().manual_seed(seed)
    width = FAMILIES[family]["context_dim"]

    def one():
        extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if family == "sdxl" else {}
        return [[torch.randn(1, 77, width, generator=gen), extra]]
    return one(), one()


def attn1_levels(family: str, pixels: int) -> list[tuple[int, int, int]]:
    """(tokens, width, count) of every attn1 call of one UNet evaluation at a square size `pixels`."""
    cfg = FAMILIES[family]
    side = pixels // 8
    levels = []
    depth_in = cfg["transformer_depth"]
    depth_out = cfg["transformer_depth_output"]
    nres = cfg["num_res_blocks"]
    for level, mult in enumerate(cfg["channel_mult"]):
        n = (side >> level) ** 2
        count = sum(depth_in[level * nres[level]: (level + 1) * nres[level]])
        out_start = level * (nres[level] + 1)      # ComfyUI pops this list from its end
        count += sum(depth_out[out_start: out_start + nres[level] + 1])
        if count:
            levels.append((n, cfg["model_channels"] * mult, count))
    last = len(cfg["channel_mult"]) - 1
    mid = cfg["transformer_depth_middle"]
    if mid:
        levels.append(((side >> last) ** 2, cfg["model_channels"] * cfg["channel_mult"][last], mid))
    return levels

"""Where each LinFusion module goes: diffusers module names -> ComfyUI (LDM) module paths.

The released files name their modules by the diffusers UNet (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1`); ComfyUI's UNet is the LDM layout (`input_blocks.1.1.transformer_blocks.0.
attn1`). ComfyUI's own `comfy.utils.unet_to_diffusers(unet_config)` knows the correspondence, so we derive
it from there rather than keep a second table that could drift.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ATTN1_SUFFIX = ".attn1.to_q.weight"
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Attn1Site:
    """One self-attention of the live UNet."""
    diffusers_name: str   # e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1
    comfy_path: str       # e.g. input_blocks.1.1.transformer_blocks.0.attn1 (inside diffusion_model)
    dim: int
    heads: int

    @property
    def level(self) -> str:
        return self.diffusers_name.split(".", 1)[0]


def _diffusers_order_key(name: str):
    # diffusers' named_modules() order: down_blocks, then up_blocks, then mid_block (registered last in
    # UNet2DConditionModel.__init__), indices numerically within each.
    top = name.split(".", 1)[0]
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[top]
    return (rank, [int(p) if p.isdigit() else p for p in _NUMBER.split(name)])


def attn1_name_map(unet_config: dict) -> dict[str, str]:
    """diffusers attn1 name -> ComfyUI attn1 path, in diffusers named_modules() order."""
    import comfy.utils

    mapping = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(ATTN1_SUFFIX):
            mapping[diffusers_key[: -len(".to_q.weight")]] = comfy_key[: -len(".to_q.weight")]
    return {k: mapping[k] for k in sorted(mapping, key=_diffusers_order_key)}


def attn1_sites(diffusion_model, unet_config: dict) -> list[Attn1Site]:
    """Every attn1 of the live UNet in diffusers order, with dims and heads read from the module itself."""
    import comfy.utils

    sites = []
    for diffusers_name, comfy_path in attn1_name_map(unet_config).items():
        attn = comfy.utils.get_attr(diffusion_model, comfy_path)
        sites.append(Attn1Site(diffusers_name, comfy_path, attn.to_q.in_features, attn.heads))
    return sites

"""An independent reference for whole-UNet tests: diffusers' UNet2DConditionModel with a ComfyUI UNet's weights.

ComfyUI's UNet (LDM layout) and diffusers' UNet are separate implementations of the same network. With
the same weights they agree to float32 rounding, so a change made to one side (LinFusion mounted through
our ComfyUI patch) can be checked against the same change made the obvious way on the other side
(LinFusion mounted on diffusers' attn1 modules, whose names are the hub config's module names).

    comfy_unet = fixture_models.build_unet_model("sd15", torch.float32).diffusion_model
    ref = diffusers_unet_from_comfy("sd15", comfy_unet)
    inputs = unet_inputs("sd15")
    torch.testing.assert_close(run_comfy_unet(comfy_unet, inputs), run_diffusers_unet(ref, inputs))

Weights are converted with ComfyUI's own key map (comfy.utils.unet_to_diffusers), the map ComfyUI uses
to load diffusers-format UNets and LoRAs.
"""
from __future__ import annotations

import torch

import fixture_models


def diffusers_key_map(family: str) -> dict[str, str]:
    """diffusers parameter name -> ComfyUI (LDM) parameter name, for this fixture's layout."""
    import comfy.utils
    return comfy.utils.unet_to_diffusers(fixture_models.unet_config(family))


def diffusers_unet_from_comfy(family: str, comfy_unet, dtype: torch.dtype = torch.float32):
    """A diffusers UNet2DConditionModel holding exactly the weights of `comfy_unet`.

    comfy_unet: ComfyUI's UNetModel (``model.diffusion_model``) or its state dict (keys without the
    ``model.diffusion_model.`` prefix). Every weight on both sides must be used: a layout mismatch raises.
    """
    from diffusers import UNet2DConditionModel

    comfy_sd = comfy_unet if isinstance(comfy_unet, dict) else comfy_unet.state_dict()
    # Built without memory, then given the converted tensors: diffusers' own random init is slow on CPU.
    with torch.device("meta"):
        ref = UNet2DConditionModel(**fixture_models.DIFFUSERS_CONFIGS[family])
    wanted = ref.state_dict()
    mapping = diffusers_key_map(family)
    converted, used = {}, set()
    for dkey in wanted:
        ckey = mapping.get(dkey)
        if ckey is None or ckey not in comfy_sd:
            raise KeyError(f"no ComfyUI weight for diffusers key {dkey!r} ({family}); mapped to {ckey!r}")
        converted[dkey] = comfy_sd[ckey].to(dtype).clone()  # own storage: the two models never share
        used.add(ckey)
    unused = sorted(set(comfy_sd) - used)
    if unused:
        raise KeyError(f"ComfyUI weights without a diffusers counterpart ({family}): {unused[:8]}")
    ref.load_state_dict(converted, strict=True, assign=True)
    stray = [n for n, t in list(ref.named_parameters()) + list(ref.named_buffers()) if t.is_meta]
    if stray:
        raise RuntimeError(f"diffusers UNet tensors left without values: {stray[:8]}")
    return ref.eval()


def unet_inputs(family: str, batch: int = 2, latent_hw: tuple[int, int] = (8, 8), tokens: int = 77,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random UNet inputs for both implementations (SDXL: pooled text + size ids, and ComfyUI's `y` of them)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    g = torch.Generator().manual_seed(seed)
    context_dim = fixture_models.BASE_UNET_CONFIGS[family]["context_dim"]
    inputs = {
        "x": torch.randn(batch, 4, *latent_hw, generator=g, dtype=dtype),
        "timesteps": torch.tensor([999.0, 500.0] * batch, dtype=dtype)[:batch],
        "context": torch.randn(batch, tokens, context_dim, generator=g, dtype=dtype),
    }
    if fixture_models.BASE_UNET_CONFIGS[family]["adm_in_channels"]:
        text_embeds = torch.randn(batch, 1280, generator=g, dtype=dtype)
        h, w = latent_hw[0] * 8, latent_hw[1] * 8
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=dtype)
        # ComfyUI's SDXL.encode_adm: pooled text, then a 256-dim timestep embedding of each size id.
        size_embeds = Timestep(256)(time_ids.flatten()).reshape(batch, -1).to(dtype)
        inputs.update(text_embeds=text_embeds, time_ids=time_ids, y=torch.cat([text_embeds, size_embeds], dim=1))
    return inputs


@torch.no_grad()
def run_comfy_unet(unet, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    return unet(inputs["x"], inputs["timesteps"], context=inputs["context"], y=inputs.get("y"),
                transformer_options=transformer_options or {})


@torch.no_grad()
def run_diffusers_unet(unet, inputs: dict) -> torch.Tensor:
    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return unet(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"],
                added_cond_kwargs=added).sample

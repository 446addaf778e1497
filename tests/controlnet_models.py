"""ControlNets of the three families for the LinFusion ControlNet tests, and a way to call them as a sampler does.

SD 1.5 is the fixture file (fixtures.controlnet_sd15, loaded by ComfyUI's own ControlNet loader). SD 2.1 and
SDXL are comfy.cldm.cldm.ControlNet built from the reduced UNet configs of linfusion_models (their model
class's own heads rules, linear projections, SDXL's adm), filled with the fixtures' variance-preserving random
weights and wrapped in comfy.controlnet.ControlNet as ComfyUI's loader wraps a file.
"""
from __future__ import annotations

import torch

from linfusion_models import build_base_model, fill_, linfusion_for


def controlnet_from_unet_config(unet_config: dict, seed: int):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "dtype", "device", "operations")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **config, dtype=torch.float32, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    fill_(net, seed)
    return comfy.controlnet.ControlNet(net.eval(), load_device=torch.device("cpu"))


def family_controlnet(core, fixtures, family: str):
    """(control_net, base BaseModel of the family for model_sampling/conditioning, LinFusion weights for it)."""
    import nodes

    if family == "sd15":
        (control,) = nodes.ControlNetLoader().load_controlnet(fixtures.controlnet_sd15)
        weights = core.weights.checkpoint.load_linfusion(str(fixtures.path("linfusion", fixtures.linfusion_folder["sd15"])))
        return control, build_base_model("sd15"), weights
    base = build_base_model(family, seed=3)
    control = controlnet_from_unet_config(base.model_config.unet_config, seed=4)
    return control, base, linfusion_for(core, base, seed=5)


def hint_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """An IMAGE (B x H x W x 3 in [0, 1]) with structure (edges), as a preprocessor would give."""
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(1, h // 8, w // 8, 3, generator=g) > 0.5).float()
    return img.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def prepared(control, base_model, image, strength=1.0, start=0.0, end=1.0, previous=None):
    """A copy set up as ControlNetApplyAdvanced and the sampler's pre_run set it up."""
    c = control.copy().set_cond_hint(image.movedim(-1, 1), strength, (start, end))
    if previous is not None:
        c.set_previous_controlnet(previous)
    c.pre_run(base_model, lambda p: base_model.model_sampling.percent_to_sigma(p))
    return c


def control_inputs(base_model, hw=(8, 8), batch: int = 2, seed: int = 0, sigma: float | None = None):
    g = torch.Generator().manual_seed(seed)
    config = base_model.model_config.unet_config
    sigma = float(base_model.model_sampling.sigma_max) * 0.5 if sigma is None else sigma
    x = torch.randn(batch, 4, *hw, generator=g) * sigma
    cond = {"c_crossattn": torch.randn(batch, 77, config["context_dim"], generator=g)}
    if config.get("adm_in_channels"):
        cond["y"] = torch.randn(batch, config["adm_in_channels"], generator=g)
    return x, torch.full((batch,), sigma), cond


@torch.no_grad()
def residuals(control, inputs) -> list[torch.Tensor]:
    x, sigma, cond = inputs
    out = control.get_control(x, sigma, cond, 1, {})
    if out is None:
        return []
    return [r.clone() for key in ("input", "middle", "output") for r in out.get(key, []) if r is not None]


def residual_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """sqrt(sum |a - b|^2) / sqrt(sum |b|^2) over every residual the ControlNet hands the UNet."""
    num = sum(((x - y).float() ** 2).sum() for x, y in zip(a, b, strict=True))
    den = sum((y.float() ** 2).sum() for y in b)
    return float((num / den) ** 0.5)

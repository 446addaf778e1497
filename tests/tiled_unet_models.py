"""Small SD-family UNets for the tiled UNet's tests, and how those tests run and compare them.

SD1.5-family and SDXL-family UNets are built directly from ComfyUI unet_configs (reduced widths, the same
block structure: conv vs linear proj, adm, transformer depths, odd-size upsampling), filled with random
std 1/sqrt(fan_in) weights; LinFusion self-attention is mounted on their attn1 (core's
module.LinFusionAttention as attn1 for direct UNet calls; installed by the core's Apply LinFusion path,
injected forwards and hybrid threshold included, for the sampler).
"""
from __future__ import annotations

import torch

from fixture_models import fill_random_

TOL = 1e-4

SD15_SMALL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=None, in_channels=4, model_channels=64, num_res_blocks=[1, 1, 1],
                  transformer_depth=[1, 1, 0], channel_mult=[1, 2, 2], transformer_depth_middle=1,
                  use_linear_in_transformer=False, context_dim=768, num_heads=8,
                  transformer_depth_output=[1, 1, 1, 1, 0, 0], use_temporal_attention=False,
                  use_temporal_resblock=False)
SDXL_SMALL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                  num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=64,
                  num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 2], channel_mult=[1, 2, 2],
                  transformer_depth_middle=2, use_linear_in_transformer=True, context_dim=2048,
                  num_head_channels=32, transformer_depth_output=[0, 0, 1, 1, 2, 2],
                  use_temporal_attention=False, use_temporal_resblock=False)
# SDXL's own block layout (3 levels of 2 res blocks, channel_mult 1-2-4, attention from level 2) at a tenth of
# its width: the UNet that SUPIR's adapters, built a tenth as wide, fit (test_tiled_unet_hooks.py).
SDXL_SUPIR = dict(SDXL_SMALL, model_channels=32, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                  transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                  transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])
CONFIGS = {"sd15": SD15_SMALL, "sdxl": SDXL_SMALL, "sd15_cast": SD15_SMALL, "sdxl_supir": SDXL_SUPIR}


def fill_random(module, seed):
    return fill_random_(module, torch.Generator().manual_seed(seed))


def build_unet(config, linfusion_cls, seed=0, skip_middle=False, operations=None):
    """UNetModel with a LinFusion module (linfusion_cls, core's module.LinFusionAttention) mounted as every
    attn1 (but the middle block's with skip_middle), random weights, eval, fp32."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    extra = {"operations": operations} if operations is not None else {}
    unet = UNetModel(**config, dtype=torch.float32, device="cpu", **extra)
    for name, m in list(unet.named_modules()):
        if isinstance(m, BasicTransformerBlock) and not (skip_middle and name.startswith("middle_block")):
            dim = m.attn1.to_q.in_features
            mid = dim // 16 if unet.num_classes is not None else None  # SDXL family: LinFusion-XL MLP width
            m.attn1 = linfusion_cls(dim, m.n_heads, mid, **extra)
    fill_random(unet, seed)
    return unet.eval()


def inputs(config, b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([999.0, 500.0][:b])
    ctx = torch.randn(b, 77, config["context_dim"], generator=g)
    y = torch.randn(b, config["adm_in_channels"], generator=g) if config.get("adm_in_channels") else None
    return x, t, ctx, y


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def small_unets(core):
    """The direct-call UNets by family: SD1.5 (its middle block left on softmax), SDXL, and SD1.5 built with
    comfy.ops.manual_cast (layers ComfyUI casts on every call: the convs run through their own forward)."""
    import comfy.ops
    lin = core.attention.module.LinFusionAttention
    return {"sd15": build_unet(SD15_SMALL, lin, 0, skip_middle=True), "sdxl": build_unet(SDXL_SMALL, lin, 1),
            "sd15_cast": build_unet(SD15_SMALL, lin, 2, skip_middle=True, operations=comfy.ops.manual_cast)}


def model_patcher(core, family, seed, min_tokens=0):
    """A ModelPatcher of the small UNet with LinFusion installed by the core's own Apply LinFusion path
    (injected attn1 forwards, weights as an additional model); min_tokens > 0 keeps softmax on small levels."""
    import comfy.model_patcher
    import comfy.supported_models
    from linfusion_models import linfusion_for
    cls = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL
    model_config = cls(dict(CONFIGS[family]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_random(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    patched, _ = core.patching.patch.apply_linfusion(patcher, linfusion_for(core, model, seed=seed + 1), min_tokens=min_tokens)
    return patched


def random_controlnet(config, seed):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    cfg = {k: v for k, v in config.items() if k not in ("out_channels",)}
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    control_model = comfy.cldm.cldm.ControlNet(**cfg)
    fill_random(control_model, seed)
    return comfy.controlnet.ControlNet(control_model.eval(), load_device=torch.device("cpu"))


def conds(family, b_ctx, controlnet=None, hint=None):
    g = torch.Generator().manual_seed(7 + b_ctx)
    ctx = torch.randn(1, 77, CONFIGS[family]["context_dim"], generator=g)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if CONFIGS[family].get("adm_in_channels") else {}
    if controlnet is not None:
        extra["control"] = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        extra["control_apply_to_uncond"] = True
    return [[ctx, extra]]


def one_step(model, family, h, w, controlnet=None):
    import comfy.sample
    g = torch.Generator().manual_seed(3)
    latent = torch.zeros(1, 4, h, w)
    noise = torch.randn(1, 4, h, w, generator=g)
    hint = torch.rand(1, 3, h * 8, w * 8, generator=g) if controlnet is not None else None
    pos, neg = conds(family, 0, controlnet, hint), conds(family, 1, controlnet, hint)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", pos, neg, latent, last_step=1,
                                   disable_pbar=True, seed=3)


def state_snapshot(patcher):
    """The model's weights at rest (ComfyUI keeps a sampled model loaded, object patches applied)."""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def sample(model, family, h, w, steps, seed=3):
    import comfy.sample
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, h, w, generator=g)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 3.0, "euler", "normal", conds(family, 0), conds(family, 1),
                                   torch.zeros(1, 4, h, w), disable_pbar=True, seed=seed)

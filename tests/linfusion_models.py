"""Tiny real UNets and matching LinFusion weights, built in memory, for the core's model-level tests.

The UNets are ComfyUI's own classes (comfy.supported_models -> BaseModel -> ModelPatcher) with reduced
configs of each family and variance-preserving random weights; the LinFusion weights are random modules
of the released layout, keyed and named exactly as a hub file (built from the model's own attn1 list).
"""
from __future__ import annotations

import math

import torch

# model_channels 64 (not 320): the same architecture and family traits (context_dim, heads rules, MLP widths)
# at ~1/25 of the cost, so patch-hygiene tests can sample many times on a shared 2-core machine.
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 64, "use_temporal_attention": False,
           "use_temporal_resblock": False}
UNET_CONFIGS = {
    "sd15": ("SD15", {**_COMMON, "adm_in_channels": None, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                      "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                      "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768}),
    "sd21": ("SD20", {**_COMMON, "adm_in_channels": None, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                      "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                      "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024}),
    "sdxl": ("SDXL", {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [1, 1],
                      "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
                      "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048}),
}
# The smallest UNet ComfyUI builds as SD 1.5 with LinFusion on it: one level, 32 channels (4 attn1). For the
# torch.compile test, where inductor's C++ compile time grows with every kernel of the model.
UNET_CONFIGS["sd15_tiny"] = ("SD15", dict(UNET_CONFIGS["sd15"][1], model_channels=32, num_heads=4, num_res_blocks=[1],
                                          channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1]))


def fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The fixtures' variance-preserving random weights (ComfyUI layers skip init), from a seed."""
    from fixture_models import fill_random_

    return fill_random_(module, torch.Generator().manual_seed(seed))


def build_base_model(family: str, dtype=torch.float32, seed: int = 1):
    import comfy.supported_models

    class_name, config = UNET_CONFIGS[family]
    model_config = getattr(comfy.supported_models, class_name)(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    fill_(model.diffusion_model, seed)
    return model


def build_patcher(family: str, dtype=torch.float32, seed: int = 1):
    import comfy.model_patcher

    model = build_base_model(family, dtype, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def linfusion_for(core, base_model, seed: int = 7, mid: str = "auto", source: str = "test_linfusion.safetensors",
                  with_config: bool = True):
    """Random LinFusion weights for every attn1 of base_model, as a loaded LINFUSION object."""
    ckpt = core.weights.checkpoint
    sites = core.patching.block_map.attn1_sites(base_model.diffusion_model, base_model.model_config.unet_config)
    xl = base_model.model_config.unet_config.get("context_dim") == 2048
    g = torch.Generator().manual_seed(seed)
    specs, sd = [], {}
    for i, s in enumerate(sites):
        mid_dim = (s.dim // 16 if xl else s.dim) if mid == "auto" else mid
        module = core.attention.module.LinFusionAttention(s.dim, s.heads, mid_dim)
        for k, p in module.state_dict().items():
            r = torch.randn(p.shape, generator=g)
            if k.endswith(".1.weight"):
                r = 1.0 + 0.1 * r
            elif p.ndim == 2:
                r = r / math.sqrt(p.shape[1])
            else:
                r = 0.02 * r
            sd[f"{i}.{k}"] = r
        specs.append(ckpt.ModuleSpec(i, s.dim, mid_dim, s.heads if with_config else None,
                                     s.diffusers_name if with_config else None))
    return ckpt.LinFusionWeights(source, specs, sd, "config.json" if with_config else "weights only")


def hub_config(weights) -> dict:
    return {"_class_name": "LinFusion", "_diffusers_version": "0.30.0",
            "modules_list": [{"dim_n": m.dim, "heads": m.heads, "module_name": m.name,
                              "projection_mid_dim": None if m.projection_mid_dim == m.dim else m.projection_mid_dim}
                             for m in weights.modules]}


def unet_inputs(base_model, batch: int = 2, hw=(8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = base_model.model_config.unet_config
    inputs = {"x": torch.randn(batch, 4, *hw, generator=g),
              "t": torch.tensor([999.0, 400.0] * batch)[:batch],
              "context": torch.randn(batch, 77, config["context_dim"], generator=g)}
    if config.get("adm_in_channels"):
        inputs["y"] = torch.randn(batch, config["adm_in_channels"], generator=g)
    return inputs


@torch.no_grad()
def run_unet(patcher, inputs: dict, transformer_options: dict | None = None) -> torch.Tensor:
    """One UNet call through ComfyUI's load path (injections happen there), as a sampler makes it."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher] + patcher.get_nested_additional_models())
    return patcher.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs.get("y"),
                                         transformer_options=transformer_options or {})


def sample(patcher, seed: int = 0, steps: int = 2, hw=(8, 8), batch: int = 1, cfg: float = 5.0) -> torch.Tensor:
    """A short real KSampler run (euler), CFG on, through comfy.sample."""
    import comfy.sample

    config = patcher.model.model_config.unet_config
    g = torch.Generator().manual_seed(1234)
    pos = torch.randn(1, 77, config["context_dim"], generator=g)
    neg = torch.randn(1, 77, config["context_dim"], generator=g)
    extra = {}
    if config.get("adm_in_channels"):
        extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": hw[1] * 8, "height": hw[0] * 8}
    latent = torch.zeros(batch, 4, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", [[pos, dict(extra)]],
                               [[neg, dict(extra)]], latent, disable_pbar=True, seed=seed)

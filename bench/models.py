"""The models the benchmarks run: ComfyUI's own UNet / VAE / ControlNet classes with random weights, and
the MODEL variants a user's graph builds from them through the extension's core functions (the ones the
Apply LinFusion, Low-Memory Mode and Tiled UNet nodes call). Nothing here re-implements a patch.

Full mode uses the SD1.5 / SDXL configs ComfyUI detects for the real checkpoints; quick mode the same
layouts at a small width (and SDXL with fewer transformer blocks), so every code path runs in seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FAMILIES = {"sd15": SD15, "sdxl": SDXL}
QUICK = {"sd15": dict(model_channels=32),
         "sdxl": dict(model_channels=64, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                      transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])}
LINFUSION_MID_DIVISOR = {"sd15": None, "sdxl": 16}       # LinFusion-1-5: MLP width C; LinFusion-XL: C / 16


def unet_config(family: str, quick: bool) -> dict:
    return dict(FAMILIES[family], **(QUICK[family] if quick else {}))


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """std 1/sqrt(fan_in) weights, unit norm scales, zero biases: unit-scale activations (ComfyUI's layers
    skip initialisation, and a NaN or a denormal would change a matmul's speed)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=gen)  # in place: no 2nd copy
            else:
                p.fill_(1.0 if name == "weight" else 0.0)
    return model


def filled(make, seed: int = 0) -> torch.nn.Module:
    """make() with fill_random's weights, built as ComfyUI builds a model. Under 0.33's DynamicVRAM (its GPU
    default) comfy.ops layers have no weight until load_state_dict, so the weights are made in a classic copy
    (DynamicVRAM off while it is built) and loaded into the real one."""
    import comfy.memory_management

    if not getattr(comfy.memory_management, "aimdo_enabled", False):
        return fill_random(make(), seed)
    comfy.memory_management.aimdo_enabled = False
    try:
        weights = fill_random(make(), seed).state_dict()
    finally:
        comfy.memory_management.aimdo_enabled = True
    module = make()
    module.load_state_dict(weights)
    return module


def patcher_class():
    """The host's CoreModelPatcher (ModelPatcherDynamic under DynamicVRAM), as its loaders give; ModelPatcher
    on older ComfyUI."""
    import comfy.model_patcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def device():
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def build(family: str, quick: bool, dtype=torch.float32, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of the family's architecture, random weights."""
    import comfy.model_management
    import comfy.supported_models as sm

    def make():
        model_config = {"sd15": sm.SD15, "sdxl": sm.SDXL}[family](unet_config(family, quick))
        model_config.set_inference_dtype(dtype, None)
        return model_config.get_model({}, "", device=torch.device("cpu"))

    model = filled(make, seed)
    model.diffusion_model.eval()
    return patcher_class()(model, load_device=device(), offload_device=comfy.model_management.unet_offload_device())


def attn1_modules(patcher) -> list:
    """Every self-attention of the UNet; Apply LinFusion swaps their forward, so they time LinFusion too."""
    return [m for name, m in patcher.model.diffusion_model.named_modules() if name.endswith(".attn1")]


def attn1_levels(family: str, pixels: int, quick: bool = False) -> list[tuple[int, int, int]]:
    """(tokens, width, count) of every attn1 call of one UNet evaluation of a square `pixels` image."""
    cfg = unet_config(family, quick)
    side, nres, levels = pixels // 8, cfg["num_res_blocks"], []
    for level, mult in enumerate(cfg["channel_mult"]):
        count = sum(cfg["transformer_depth"][level * nres[level]: (level + 1) * nres[level]])
        start = level * (nres[level] + 1)          # ComfyUI pops the output list from its end
        count += sum(cfg["transformer_depth_output"][start: start + nres[level] + 1])
        if count:
            levels.append(((side >> level) ** 2, cfg["model_channels"] * mult, count))
    last = len(cfg["channel_mult"]) - 1
    if cfg["transformer_depth_middle"]:
        levels.append(((side >> last) ** 2, cfg["model_channels"] * cfg["channel_mult"][last],
                       cfg["transformer_depth_middle"]))
    return levels


def linfusion_weights(core, patcher, family: str, folder: Path, seed: int = 0):
    """Random LinFusion weights in the hub layout for every attn1 of the MODEL, loaded by Load LinFusion's
    core function (so the file format and the checks a user's file goes through are exercised)."""
    from safetensors.torch import save_file

    gen, sd, modules = torch.Generator().manual_seed(seed), {}, []
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).half()
    for i, (name, attn) in enumerate(_diffusers_attn1_names(patcher)):
        dim, div = attn.to_q.in_features, LINFUSION_MID_DIVISOR[family]
        mid = dim // div if div else dim
        modules.append({"dim_n": dim, "heads": attn.heads, "module_name": name,
                        "projection_mid_dim": mid if div else None})
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[f"{i}.{proj}.weight"] = rnd(dim, dim)
        sd[f"{i}.to_out.0.bias"] = torch.zeros(dim).half()
        for mlp in ("to_q_", "to_k_"):
            sd.update({f"{i}.{mlp}.0.weight": rnd(mid, dim), f"{i}.{mlp}.0.bias": torch.zeros(mid).half(),
                       f"{i}.{mlp}.1.weight": torch.ones(mid).half(), f"{i}.{mlp}.1.bias": torch.zeros(mid).half(),
                       f"{i}.{mlp}.3.weight": rnd(dim, mid), f"{i}.{mlp}.3.bias": torch.zeros(dim).half()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": modules}))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return core.weights.checkpoint.load_linfusion(str(folder))


def _diffusers_attn1_names(patcher):
    """(diffusers module name, ComfyUI attn1) in the hub's order: down blocks, up blocks, mid block last."""
    import re

    import comfy.utils
    to_ldm = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    suffix = ".to_q.weight"
    names = {k[: -len(suffix)] for k in to_ldm if k.endswith(".attn1" + suffix)}
    order = lambda n: ({"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[n.split(".")[0]],
                       [int(p) for p in re.findall(r"\.(\d+)", n)])
    unet = patcher.model.diffusion_model
    return [(n, unet.get_submodule(to_ldm[n + suffix][: -len(suffix)])) for n in sorted(names, key=order)]


def variant(core, base, weights, name: str, tile: int = 64):
    """The MODEL a graph builds: "sdpa" or "linfusion", then optional "+low-memory" and "+tiled", in the
    order of the shipped workflows (Apply LinFusion -> Low-Memory Mode -> Tiled UNet). attn2 (and attn1
    where softmax) runs PyTorch SDPA, ComfyUI's own backend chosen per call."""
    import comfy.ldm.modules.attention as attention

    model = base.clone()
    sdpa = attention.attention_pytorch
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda _default, *a, **kw: sdpa(*a, **kw)
    parts = name.split("+")
    if parts[0] == "linfusion":
        model = core.patching.patch.apply_linfusion(model, weights)[0]
    if "low-memory" in parts:        # the node's defaults, as the shipped workflows set it
        model = core.patching.low_memory.LowMemoryOptions().apply(model)
    if "tiled" in parts:
        model = core.tiling.tiled_unet_patch.apply_tiled_unet(model, tile, "cpu", progress=False)
    return model


def conditioning(family: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = FAMILIES[family]["context_dim"]
    extra = lambda: {"pooled_output": torch.randn(1, 1280, generator=gen)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, width, generator=gen), extra()]], [[torch.randn(1, 77, width, generator=gen), extra()]]


def sample(model, family: str, px: int, steps: int = 1, controlnet=None, seed: int = 0, height: int | None = None):
    """comfy.sample.sample (what KSampler calls) of a px x height image (square by default): Euler, CFG 7.5,
    cond + uncond batched, one step by default."""
    import comfy.sample
    import nodes

    height = height or px
    positive, negative = conditioning(family, seed)
    if controlnet is not None:        # Apply ControlNet (Advanced), as workflow 4 wires it
        hint = torch.rand(1, height, px, 3, generator=torch.Generator().manual_seed(seed))
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint,
                                                                             0.8, 0.0, 1.0)
    latent = torch.zeros(1, 4, height // 8, px // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def controlnet(family: str, quick: bool, dtype=torch.float32, seed: int = 2):
    """A ControlNet of the family's layout (softmax self-attention of its own), as ControlNetLoader gives."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    cfg = {k: v for k, v in unet_config(family, quick).items() if not k.startswith("use_temporal")}
    net = filled(lambda: comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=dtype,
                                                    operations=comfy.ops.disable_weight_init, **cfg), seed)
    return comfy.controlnet.ControlNet(net.eval(), load_device=device())


def vae(quick: bool, dtype=None, seed: int = 0):
    """The SD1.x/SDXL AutoencoderKL through comfy.sd.VAE (quarter width in quick mode), random weights."""
    from random_vae import SD_DDCONFIG, SMALL_DDCONFIG, load_vae, random_vae_state_dict

    config = SMALL_DDCONFIG if quick else SD_DDCONFIG
    return load_vae(random_vae_state_dict(config, seed), config if quick else None, dtype=dtype)

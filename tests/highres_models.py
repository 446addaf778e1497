"""Small real ComfyUI models for the high-res tests: an SD1.5-family UNet, VAE and ControlNet built from small
configs with ComfyUI's own classes, random weights filled with a variance-preserving scale (ComfyUI layers
skip initialisation). Import only after the `host` fixture booted ComfyUI."""
from __future__ import annotations

import math

import torch

CONTEXT_DIM = 64
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_spatial_transformer": True, "legacy": False,
    "context_dim": CONTEXT_DIM, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The real SD 1.5 UNet layout (for the benchmark).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "legacy": False, "context_dim": 768, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
}
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def fill_weights(module: torch.nn.Module, seed: int) -> None:
    """std 1/sqrt(fan_in) for weights, small random biases, unit norm scales: attention and every layer matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def unet_patcher(unet_config: dict = TINY_UNET, seed: int = 0, dtype=torch.float32, family: str = "SD15"):
    """A ModelPatcher around a real comfy BaseModel of the family's model class (SD15: eps prediction, SD1 latent
    format; SDXL: also encode_adm)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, family)(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    fill_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_vae(seed: int = 1):
    import comfy.ldm.models.autoencoder
    import comfy.sd

    params = {"ddconfig": dict(TINY_VAE), "embed_dim": 4}
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(**params)
    fill_weights(ae, seed)
    with torch.no_grad():  # keep the latent in a sane range for the sampler
        for name, p in ae.named_parameters():
            if name.startswith("encoder.conv_out"):
                p.mul_(0.3)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})


def tiny_controlnet(seed: int = 2):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    cfg = {k: v for k, v in TINY_UNET.items() if k not in ("use_temporal_resblock", "use_temporal_attention")}
    cm = comfy.cldm.cldm.ControlNet(hint_channels=3, num_heads=8, dtype=torch.float32,
                                    operations=comfy.ops.disable_weight_init, **cfg)
    fill_weights(cm, seed)
    return comfy.controlnet.ControlNet(cm, load_device=comfy.model_management.get_torch_device())


def conditioning(seed: int, tokens: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=g), {}]]


def model_state(model_patcher) -> dict:
    """Everything that must be bit-identical before and after a patched run: every tensor of the UNet and the
    dilation/padding of every convolution, plus the module types (object patches restored)."""
    unet = model_patcher.model.diffusion_model
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    convs = {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    types = {n: type(m) for n, m in unet.named_modules()}
    inplace = {n: m.inplace for n, m in unet.named_modules() if isinstance(m, torch.nn.SiLU)}
    return {"tensors": state, "convs": convs, "types": types, "inplace": inplace}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["convs"] == after["convs"], "convolution dilation/padding changed"
    assert before["types"] == after["types"], "module types changed (an object patch was left behind)"
    assert before["inplace"] == after["inplace"], "SiLU in-place flags changed"
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), f"tensor {k} changed"


# A small SDXL-family UNet (text_time add-embedding, SDXL latent format), built without detection. SDXL's
# model config forces 64-channel heads: attention only where there are 64 channels (one head).
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1], "use_spatial_transformer": True, "legacy": False,
    "context_dim": CONTEXT_DIM, "use_linear_in_transformer": True, "num_classes": "sequential",
    "adm_in_channels": 2816, "use_temporal_resblock": False, "use_temporal_attention": False,
}
SDXL_POOLED_DIM = 1280  # adm 2816 = pooled text 1280 + 6 size ids x 256


def sdxl_unet_patcher(seed: int = 0, dtype=torch.float32):
    """A ModelPatcher around a real comfy.model_base.SDXL (eps prediction, SDXL latent format, encode_adm)."""
    return unet_patcher(TINY_SDXL_UNET, seed, dtype, family="SDXL")


def sdxl_conditioning(seed: int, tokens: int = 8, **options):
    """SDXL conditioning as CLIPTextEncode writes it (tokens + pooled output); options e.g. width/height."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=g),
             {"pooled_output": torch.randn(1, SDXL_POOLED_DIM, generator=g), **options}]]

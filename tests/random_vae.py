"""Random-weight VAEs of ComfyUI's own AutoencoderKL architecture, loaded through comfy.sd.VAE.

Weights are variance preserving (std 1/sqrt(fan_in)), GroupNorm affines near 1/0: with tiny weights the
attention and the norms would barely matter and a broken tiling could still "match".
"""
from __future__ import annotations

import math

import torch

SD_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# Same layer types and topology (4 levels, 2 res blocks, shortcut convs, mid attention), a quarter the width:
# CPU tests at several tile sizes stay fast.
SMALL_DDCONFIG = dict(SD_DDCONFIG, ch=64)
# Narrower still, for half precision: this CPU runs fp16/bf16 convolutions ~100x slower than fp32.
TINY_DDCONFIG = dict(SD_DDCONFIG, ch=32)


def random_vae_state_dict(ddconfig=SD_DDCONFIG, seed: int = 0) -> dict:
    """A state dict in the original (LDM) key layout, as a VAE file holds it."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=ddconfig["z_channels"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):        # GroupNorm scale
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_vae(state_dict: dict, ddconfig=None, dtype=None):
    """comfy.sd.VAE from a state dict: detected like a VAE file when ddconfig is None."""
    import comfy.sd

    config = None if ddconfig is None else {"params": {"ddconfig": dict(ddconfig), "embed_dim": ddconfig["z_channels"]}}
    return comfy.sd.VAE(sd=dict(state_dict), config=config, dtype=dtype)

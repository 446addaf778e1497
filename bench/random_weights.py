"""Random weights that keep activations at unit scale, for models whose layers skip initialisation.

ComfyUI's layers (comfy.ops.disable_weight_init) leave their tensors uninitialised. Benchmarks need
finite, realistic activations (a NaN or a denormal changes the speed of a matmul), so every weight gets
std 1/sqrt(fan_in), norms get unit scale and biases zero.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def fill_variance_preserving(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            if weight.ndim >= 2:
                fan_in = math.prod(weight.shape[1:])
                # normal_ on the CPU tensor in place: a 2.6 B parameter model must not be copied.
                weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            else:
                weight.fill_(1.0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()
    return model

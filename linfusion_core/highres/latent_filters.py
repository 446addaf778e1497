"""Latent-space filters of the DemoFusion-style refinement: Gaussian blur and per-channel statistics.

Pure tensor functions on B x C x H x W latents. Statistics are taken per sample and per channel, in fp32
(a 16K latent has 2M cells per channel: fp16 sums would overflow), and results keep the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std (B x C x 1 x 1 each, fp32). The std is torch's default (Bessel
    corrected), as in the paper's code: anchoring a large latent to a small base latent's stats then gives
    exactly the official numbers (the correction does not cancel when the two sizes differ)."""
    xf = x.float().flatten(2)
    mean = xf.mean(dim=2)[..., None, None]
    std = xf.std(dim=2, unbiased=xf.shape[2] > 1)[..., None, None].clamp_min(eps)
    return mean, std


def match_stats(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x shifted and scaled so that each (sample, channel) has the given mean and std."""
    x_mean, x_std = channel_stats(x)
    return ((x.float() - x_mean) / x_std * std.float() + mean.float()).to(x.dtype)


def restandardise(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with the per-channel mean/std of `like` (used after a blur: the blur must not change contrast)."""
    return match_stats(x, *channel_stats(like))


def gaussian_kernel_1d(kernel_size: int, sigma: float, device=None) -> torch.Tensor:
    if kernel_size % 2 != 1:
        raise ValueError(f"the Gaussian kernel size must be odd, got {kernel_size}")
    r = torch.arange(kernel_size, device=device, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (r / max(float(sigma), 1e-6)) ** 2)
    return k / k.sum()


BLUR_PADDINGS = ("zeros", "reflect")


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable depthwise Gaussian blur. padding "zeros" is the paper's (its conv2d pads with zeros, which
    darkens the latent's edges a little before re-standardisation); "reflect" avoids that (replicate where the
    latent is too small to reflect)."""
    if kernel_size <= 1:
        return x
    if padding not in BLUR_PADDINGS:
        raise ValueError(f"blur padding must be one of {BLUR_PADDINGS}, got {padding!r}")
    b, c, h, w = x.shape
    k = gaussian_kernel_1d(kernel_size, sigma, x.device)
    pad = kernel_size // 2
    if padding == "zeros":
        y = F.pad(x.float(), (pad, pad, pad, pad))
    else:
        y = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect" if pad < h and pad < w else "replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    return y.to(x.dtype)


def blur_restandardised(x: torch.Tensor, kernel_size: int, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """The dilated branch's input: x blurred, then given back its pre-blur per-channel mean/std."""
    if kernel_size <= 1:
        return x
    return restandardise(gaussian_blur(x, kernel_size, sigma, padding), x)

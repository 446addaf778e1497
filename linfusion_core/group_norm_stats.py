"""GroupNorm over a whole image that is only ever seen one tile at a time.

Statistics are kept per channel (count, mean, M2 in fp32) and merged with Chan's parallel formula, so
any partition of the image into tiles gives the same numbers as one pass over the full tensor (up to
fp32 rounding). Per-channel statistics of equal counts merge into per-group statistics exactly, so the
producer of an activation does not need to know the group count of the norm that will read it.
"""
from __future__ import annotations

import torch


class ChannelStats:
    """Running count / mean / M2 per channel of a 1 x C x H x W activation, accumulated tile by tile."""

    def __init__(self, channels: int, device):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float32, device=device)

    def update(self, tile: torch.Tensor) -> None:
        """Add a tile (1 x C x h x w, any dtype) whose pixels no other tile covers."""
        x = tile.detach().flatten(2)[0].float()          # C x n
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        m2 = (x - mean[:, None]).square().sum(dim=1)
        mean, m2 = mean.to(self.mean.device), m2.to(self.m2.device)
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.: exact merge of two partial (count, mean, M2) summaries.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def group_mean_rstd(self, num_groups: int, eps: float):
        """Per-channel mean and 1/sqrt(var + eps) of each channel's group (biased variance, as GroupNorm)."""
        channels = self.mean.shape[0]
        if channels % num_groups:
            raise ValueError(f"{channels} channels do not split into {num_groups} groups")
        means = self.mean.view(num_groups, -1)
        m2s = self.m2.view(num_groups, -1)
        group_mean = means.mean(dim=1, keepdim=True)
        # Channels of a group all have the same count, so the merged M2 adds the spread of their means.
        group_m2 = m2s.sum(dim=1, keepdim=True) + self.count * (means - group_mean).square().sum(dim=1, keepdim=True)
        var = group_m2 / (self.count * means.shape[1])
        rstd = torch.rsqrt(var + eps)
        return group_mean.expand_as(means).reshape(-1), rstd.expand_as(means).reshape(-1)


def apply_group_norm(tile: torch.Tensor, stats: ChannelStats, norm: torch.nn.GroupNorm, silu: bool) -> torch.Tensor:
    """Normalise a tile with whole-image statistics and the norm's own eps and affine (in fp32)."""
    import comfy.model_management

    mean, rstd = stats.group_mean_rstd(norm.num_groups, norm.eps)
    x = tile.float()
    scale = rstd.to(x.device)
    shift = -mean.to(x.device) * scale
    if norm.affine:
        weight = comfy.model_management.cast_to(norm.weight, torch.float32, x.device)
        bias = comfy.model_management.cast_to(norm.bias, torch.float32, x.device)
        scale, shift = scale * weight, shift * weight + bias
    x = x * scale[None, :, None, None] + shift[None, :, None, None]
    if silu:
        x = torch.nn.functional.silu(x)
    return x

"""Exact GroupNorm over a feature map that is only ever seen tile by tile.

Per tile and group we reduce count / mean / M2 in fp32 and merge them with Chan's parallel formula, so
the statistics equal those of the whole map up to rounding (no estimate from a downscaled copy).
GroupNorm uses the biased variance: var = M2 / count.
"""
from __future__ import annotations

import torch


class GroupStats:
    """Running per-(batch, group) count / mean / M2, merged exactly across tiles."""

    def __init__(self, num_groups: int):
        self.num_groups = num_groups
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, tile: torch.Tensor) -> None:
        """Fold one tile (B x C x h x w, any dtype) into the statistics."""
        b, c = tile.shape[:2]
        g = tile.float().reshape(b, self.num_groups, -1)
        n = g.shape[-1]
        if n == 0:
            return
        mean = g.mean(dim=-1)
        m2 = ((g - mean.unsqueeze(-1)) ** 2).sum(dim=-1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        mean, m2 = mean.to(self.mean.device), m2.to(self.mean.device)
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.: exact merge of two partial (count, mean, M2) summaries.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, group) mean and 1/sqrt(biased var + eps), fp32."""
        var = self.m2 / self.count
        return self.mean, torch.rsqrt(var + eps)


def group_norm_with_stats(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                          weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm of a tile using statistics of the whole map (computed in fp32, returned in x.dtype)."""
    b, c = x.shape[:2]
    g = x.float().reshape(b, num_groups, -1)
    g = (g - mean.to(g.device).unsqueeze(-1)) * rstd.to(g.device).unsqueeze(-1)
    y = g.reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y.to(x.dtype)

"""GroupNorm over a feature map that is only ever seen one tile at a time.

Statistics (count, mean, M2 in fp32) are merged with Chan's parallel formula, so any partition of the
map into tiles gives the same numbers as one pass over the full tensor (up to fp32 rounding); GroupNorm
uses the biased variance M2 / count. Two granularities share that merge:
- `ChannelStats` (tiled VAE, batch 1): per channel, so the producer of an activation need not know the
  group count of the norm that reads it (channels of equal counts merge into groups exactly);
- per (batch, group) parts (tiled UNet: `group_part`, `merge_parts`), for batched UNet calls, folded by the
  runner's partition in tile order (tiling/tiled_unet_distributed.py across ranks).
"""
from __future__ import annotations

import torch


def chan_merge(count: int, mean, m2, n: int, tile_mean, tile_m2):
    """Chan et al.: exact merge of a running (count, mean, M2) with a tile's (n, mean, M2)."""
    if count == 0:
        return n, tile_mean, tile_m2
    total = count + n
    delta = tile_mean - mean
    return total, mean + delta * (n / total), m2 + tile_m2 + delta.square() * (count * n / total)


def channel_part(tile: torch.Tensor):
    """One tile's (count, mean, M2) per channel, fp32 (1 x C x h x w, any dtype). ChannelStats.update folds it
    in; the distributed tiled VAE folds the parts of every rank's tiles in the same order (merge_parts)."""
    x = tile.detach().flatten(2)[0].float()          # C x n
    n = x.shape[1]
    if n == 0:
        return 0, None, None
    mean = x.mean(dim=1)
    return n, mean, (x - mean[:, None]).square().sum(dim=1)


class ChannelStats:
    """Running count / mean / M2 per channel of a 1 x C x H x W activation, accumulated tile by tile."""

    def __init__(self, channels: int, device):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float32, device=device)

    def update(self, tile: torch.Tensor) -> None:
        """Add a tile (1 x C x h x w, any dtype) whose pixels no other tile covers."""
        n, mean, m2 = channel_part(tile)
        if n == 0:
            return
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, n,
                                                    mean.to(self.mean.device), m2.to(self.m2.device))

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


def group_part(tile: torch.Tensor, num_groups: int):
    """One tile's (count, mean, M2) per (batch, group), fp32 (B x C x h x w, any dtype)."""
    b = tile.shape[0]
    g = tile.float().reshape(b, num_groups, -1)
    n = g.shape[-1]
    if n == 0:
        return 0, None, None
    mean = g.mean(dim=-1)
    return n, mean, (g - mean.unsqueeze(-1)).square().sum(dim=-1)


def merge_parts(acc, part):
    """Fold a tile's part into the running (count, mean, M2) (acc None: nothing yet). Folding the tiles' parts
    in one fixed order gives the same bits wherever each part was computed (tiled_unet_distributed.py)."""
    n, mean, m2 = part
    if n == 0:
        return acc
    if acc is None or acc[0] == 0:
        return n, mean, m2
    count, acc_mean, acc_m2 = acc
    return chan_merge(count, acc_mean, acc_m2, n, mean.to(acc_mean.device), m2.to(acc_mean.device))


def stats_mean_rstd(stats, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, group) mean and 1/sqrt(biased var + eps), fp32, of merged (count, mean, M2)."""
    count, mean, m2 = stats
    return mean, torch.rsqrt(m2 / count + eps)


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

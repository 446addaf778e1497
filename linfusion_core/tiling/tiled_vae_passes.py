"""One layer of a VAE run over a whole image, tile by tile, exactly.

Every pass reads its input activation (parked whole, on the park device) through windows with the halo
its layer needs, computes one output tile on the compute device, accumulates that tile's per-channel
GroupNorm statistics over its core and parks it. The next layer therefore sees exactly what the untiled
network would have computed; the accelerator only ever holds one tile (plus halo) of one layer.
The modules called are the model's own (conv layers through their forward, so ComfyUI's weight casting
and low-VRAM offloading still apply).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .group_norm_stats import ChannelStats, apply_group_norm
from .tile_grid import read_window, tile_cores
from .vae_attention import online_softmax_attention


@dataclass
class Parked:
    """A whole activation (1 x C x H x W) and its per-channel statistics; tensor is None in a dry run."""
    shape: tuple                     # (C, H, W)
    tensor: Optional[torch.Tensor] = None
    stats: Optional[ChannelStats] = None


class TiledPasses:
    """Runs layers tile by tile. With dry=True it only counts tiles (for the progress bar total)."""

    def __init__(self, *, device, park_device, dtype, tile_size: int, ref_channels: int,
                 on_tile: Optional[Callable[[], None]] = None, check_interrupt: Optional[Callable[[], None]] = None,
                 dry: bool = False, partition=None):
        self.device = device
        self.park_device = park_device
        self.dtype = dtype
        self.tile_size = tile_size
        self.ref_channels = ref_channels
        self.on_tile = on_tile
        self.check_interrupt = check_interrupt
        self.dry = dry
        self.tile_count = 0
        # Several processes (tiled_vae_distributed.py): which tiles this one computes and what crosses between
        # them. None: one process computes every tile, and nothing below changes.
        self.partition = partition
        # Largest attention score block (query chunk x key chunk): the element count of one tile.
        self.attention_chunk = max(64, math.isqrt(tile_size * tile_size * ref_channels))

    def tile_side(self, channels: int) -> int:
        """Tile side at a layer: the same number of elements per tile whatever the channel count."""
        return max(8, int(self.tile_size * math.sqrt(self.ref_channels / channels)))

    def park(self, tensor: torch.Tensor, with_stats: bool = True) -> Parked:
        """Park an already computed (small, e.g. latent-sized) activation."""
        tensor = tensor.to(self.dtype)
        stats = None
        if with_stats:
            stats = ChannelStats(tensor.shape[1], self.device)
            stats.update(tensor)
        parked = Parked(tuple(tensor.shape[1:]), tensor.to(self.park_device), stats)
        if self.partition is not None:          # computed identically by every rank: all rows valid everywhere
            self.partition.everywhere(parked.tensor)
        return parked

    # -- the loop shared by every layer ------------------------------------------------------------
    def _run(self, shape, channels_for_tile: int, make_tile, with_stats=True, park_device=None, side=None,
             reads=()) -> Parked:
        """reads: (Parked input, rows_of(core) -> (first, end) rows make_tile reads of it, or None for all rows);
        only a partition uses them (to fetch rows other processes computed)."""
        channels, height, width = shape
        cores = tile_cores(height, width, side or self.tile_side(channels_for_tile))
        if self.partition is not None:
            return self.partition.run_layer(self, shape, cores, make_tile, reads, with_stats, park_device)
        self.tile_count += len(cores)
        if self.dry:
            return Parked(shape)
        out = torch.empty((1, channels, height, width), dtype=self.dtype, device=park_device or self.park_device)
        stats = ChannelStats(channels, self.device) if with_stats else None
        for y0, y1, x0, x1 in cores:
            if self.check_interrupt is not None:
                self.check_interrupt()
            tile = make_tile(y0, y1, x0, x1).to(self.dtype)
            if stats is not None:
                stats.update(tile)       # the cores partition the image: every pixel counted once
            out[:, :, y0:y1, x0:x1] = tile.to(out.device)
            del tile
            if self.on_tile is not None:
                self.on_tile()
        return Parked(shape, out, stats)

    # -- building blocks ---------------------------------------------------------------------------
    def _conv_tile(self, src: Parked, conv, y0, y1, x0, x1, norm=None, silu=False) -> torch.Tensor:
        """conv(silu(norm(src))) on one core, for a stride-1 conv with 'same' zero padding."""
        halo = conv.padding[0]
        window, pad = read_window(src.tensor, y0 - halo, y1 + halo, x0 - halo, x1 + halo, self.device)
        if norm is not None:
            window = apply_group_norm(window, src.stats, norm, silu)
        window = F.pad(window.to(self.dtype), pad)        # the conv's zero padding, after the norm
        out = conv(window)                                 # the module pads by `halo` again: crop it off
        return out[:, :, halo:out.shape[2] - halo, halo:out.shape[3] - halo] if halo else out

    def conv(self, src: Parked, conv, norm=None, silu=False, residual=None, with_stats=True,
             park_device=None, residual_reads=()) -> Parked:
        """One stride-1 'same' conv layer, optionally after GroupNorm(+SiLU) and before a residual add."""
        _check_same_conv(conv)
        shape = (conv.out_channels,) + tuple(src.shape[1:])
        reads = ((src, _halo_rows(conv.padding[0])),) + tuple(residual_reads)

        def make_tile(y0, y1, x0, x1):
            out = self._conv_tile(src, conv, y0, y1, x0, x1, norm, silu)
            if residual is not None:
                out = residual(y0, y1, x0, x1) + out       # x + h, in the model dtype, as ResnetBlock
            return out
        return self._run(shape, max(conv.in_channels, conv.out_channels), make_tile, with_stats, park_device,
                         reads=reads)

    # -- ComfyUI's layer types -----------------------------------------------------------------------
    def resnet_block(self, x: Parked, block) -> Parked:
        """ResnetBlock (temb None, dropout off in eval): two passes, h = conv1(silu(norm1(x))), then
        conv2(silu(norm2(h))) + shortcut(x)."""
        h = self.conv(x, block.conv1, norm=block.norm1, silu=True)
        if block.in_channels == block.out_channels:
            def residual(y0, y1, x0, x1):
                return x.tensor[:, :, y0:y1, x0:x1].to(self.device)
            residual_rows = _halo_rows(0)
        else:
            shortcut = block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut
            _check_same_conv(shortcut)

            def residual(y0, y1, x0, x1):
                return self._conv_tile(x, shortcut, y0, y1, x0, x1)
            residual_rows = _halo_rows(shortcut.padding[0])
        out = self.conv(h, block.conv2, norm=block.norm2, silu=True, residual=residual,
                        residual_reads=((x, residual_rows),))
        del h
        return out

    def upsample(self, x: Parked, up) -> Parked:
        """Upsample: nearest x2 then a 3x3 'same' conv; each tile upsamples only the source rows it needs."""
        _check_same_conv(up.conv)
        channels, height, width = x.shape
        big_h, big_w = 2 * height, 2 * width
        halo = up.conv.padding[0]

        def make_tile(y0, y1, x0, x1):
            ay0, ay1 = max(y0 - halo, 0), min(y1 + halo, big_h)      # needed rows of the upsampled image
            ax0, ax1 = max(x0 - halo, 0), min(x1 + halo, big_w)
            sy0, sx0 = ay0 // 2, ax0 // 2
            src = x.tensor[:, :, sy0:(ay1 - 1) // 2 + 1, sx0:(ax1 - 1) // 2 + 1].to(self.device)
            src = src.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # == nearest, scale 2
            src = src[:, :, ay0 - 2 * sy0:ay1 - 2 * sy0, ax0 - 2 * sx0:ax1 - 2 * sx0]
            src = F.pad(src, (ax0 - (x0 - halo), (x1 + halo) - ax1, ay0 - (y0 - halo), (y1 + halo) - ay1))
            out = up.conv(src)
            return out[:, :, halo:out.shape[2] - halo, halo:out.shape[3] - halo]

        def source_rows(core):
            return max(core[0] - halo, 0) // 2, (min(core[1] + halo, big_h) - 1) // 2 + 1
        return self._run((up.conv.out_channels, big_h, big_w), channels, make_tile, reads=((x, source_rows),))

    def downsample(self, x: Parked, down) -> Parked:
        """Downsample: zero pad right/bottom by one, then a 3x3 stride-2 conv without padding."""
        conv = down.conv
        channels, height, width = x.shape
        out_h, out_w = (height + 1 - 3) // 2 + 1, (width + 1 - 3) // 2 + 1

        def make_tile(y0, y1, x0, x1):
            window, pad = read_window(x.tensor, 2 * y0, 2 * y1 + 1, 2 * x0, 2 * x1 + 1, self.device)
            return conv(F.pad(window, pad))
        return self._run((conv.out_channels, out_h, out_w), channels, make_tile,
                         reads=((x, lambda core: (2 * core[0], 2 * core[1] + 1)),))

    def attention_block(self, x: Parked, attn) -> Parked:
        """AttnBlock: x + proj_out(softmax(q k^T / sqrt(C)) v) over ALL pixels of the image.

        Pass 1 parks k and v for the whole image; pass 2 computes, per query tile, attention against
        all keys in chunks (online softmax), so no score block is larger than one tile's elements."""
        channels = x.shape[0]

        def make_kv(y0, y1, x0, x1):
            h = apply_group_norm(x.tensor[:, :, y0:y1, x0:x1].to(self.device), x.stats, attn.norm, silu=False)
            h = h.to(self.dtype)
            return torch.cat([attn.k(h), attn.v(h)], dim=1)
        kv = self._run((2 * channels,) + tuple(x.shape[1:]), 2 * channels, make_kv, with_stats=False,
                       reads=((x, _halo_rows(0)),))
        scale = channels ** -0.5
        chunk = self.attention_chunk

        def key_value_chunks():
            flat = kv.tensor.flatten(2)[0]                 # 2C x N
            for start in range(0, flat.shape[1], chunk):
                piece = flat[:, start:start + chunk].to(self.device)
                yield piece[:channels].T, piece[channels:].T

        def make_out(y0, y1, x0, x1):
            core = x.tensor[:, :, y0:y1, x0:x1].to(self.device)
            h = apply_group_norm(core, x.stats, attn.norm, silu=False).to(self.dtype)
            q = attn.q(h).flatten(2)[0].T                  # n x C
            o = online_softmax_attention(q, key_value_chunks(), scale, query_chunk=chunk)
            o = o.T.reshape(1, channels, y1 - y0, x1 - x0).to(self.dtype)
            return core + attn.proj_out(o)
        out = self._run(x.shape, channels, make_out, reads=((x, _halo_rows(0)), (kv, None)))   # every key
        del kv
        return out


def _halo_rows(halo: int):
    """rows_of for a pass that reads its input's core rows and `halo` rows each side."""
    return lambda core: (core[0] - halo, core[1] + halo)


def same_conv_problem(conv) -> Optional[str]:
    """None for a stride-1 'same' zero-padded Conv2d (what a pass tiles exactly), else what differs."""
    if not isinstance(conv, torch.nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return f"stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups}"
    if not (conv.kernel_size[0] == conv.kernel_size[1] == 2 * conv.padding[0] + 1
            and conv.padding[0] == conv.padding[1]):
        return f"kernel {conv.kernel_size} with padding {conv.padding} is not 'same'"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    return None


def downsample_conv_problem(conv) -> Optional[str]:
    """None for the SD VAE's downsample conv (3x3, stride 2, no padding), else what differs."""
    if not isinstance(conv, torch.nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((3, 3), (2, 2), (0, 0), (1, 1), 1):
        return f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding} is not the 3x3/2 downsample"
    return None


def _check_same_conv(conv) -> None:
    # tiled_vae.unsupported_reason rejects such a layer before the first pass; this only guards the walk.
    problem = same_conv_problem(conv)
    if problem is not None:
        raise NotImplementedError(f"not a stride-1 'same' zero-padded Conv2d ({problem}): {conv}")

"""Tiles of a 2D activation: a partition into cores, and windows around a core read with zero padding."""
from __future__ import annotations

from typing import List, Tuple

import torch


def tile_ranges(length: int, tile: int) -> List[Tuple[int, int]]:
    """[start, end) pieces of at most `tile` that cover 0..length exactly once (the last may be shorter)."""
    tile = max(1, int(tile))
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def tile_cores(height: int, width: int, tile: int) -> List[Tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every tile core, row by row; the cores partition the image."""
    return [(y0, y1, x0, x1) for y0, y1 in tile_ranges(height, tile) for x0, x1 in tile_ranges(width, tile)]


def read_window(src: torch.Tensor, y0: int, y1: int, x0: int, x1: int, device) -> Tuple[torch.Tensor, tuple]:
    """The part of src[..., y0:y1, x0:x1] inside the image, moved to `device`, and the F.pad amounts
    (left, right, top, bottom) that complete it to the full window with zeros.

    Padding is returned rather than applied because a GroupNorm may have to run first: a convolution
    pads its *normalised* input with zeros, so the zeros must be added after the norm.
    """
    height, width = src.shape[-2:]
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    window = src[..., cy0:cy1, cx0:cx1].to(device)
    return window, (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1)

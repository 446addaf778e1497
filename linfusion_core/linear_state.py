"""LinFusion's global attention state, additive over tokens (LINFUSION_FACTS.md section 2).

state = (sum_n K_n^T V_n, sum_n K_n, N) with K = elu(k) + 1, per head, accumulated in fp32. Computed
tile by tile and merged by addition it equals the state of the whole map, so a tile's output
out = (Q S / N) / (Q sum(K) / N + 1e-4) is exactly the untiled one.
TEMPORARY: the tiled UNet's own copy until linfusion_core/attention.py (core helper) lands with the same
compute / merge / apply API; then this file should forward to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def compute_state(k: torch.Tensor, v: torch.Tensor, heads: int):
    """(kv: B x h x d x d, k_sum: B x h x d, count) of these tokens, fp32."""
    kf = F.elu(_heads(k, heads).float()) + 1.0
    vf = _heads(v, heads).float()
    return kf.transpose(-1, -2) @ vf, kf.sum(dim=-2), k.shape[1]


def merge_state(a, b):
    if a is None:
        return b
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def apply_state(q: torch.Tensor, state, heads: int) -> torch.Tensor:
    """Linear attention of queries q (B x n x C) against a (merged) global state; B x n x C in q.dtype."""
    kv, k_sum, count = state
    qf = F.elu(_heads(q, heads).float()) + 1.0
    z = qf @ (k_sum / count).unsqueeze(-1) + 1e-4
    out = (qf @ (kv / count)) / z
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)

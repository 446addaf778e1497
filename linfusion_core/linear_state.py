"""LinFusion's global attention state, additive over tokens (LINFUSION_FACTS.md section 2).

TEMPORARY stand-in, same names and semantics as linfusion_core/attention.py of the core branch
(`LinearAttentionState`, `linear_attention_state`, `apply_linear_attention_state`): delete this file and
import from .attention once that lands on main.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-4


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2).float()


@dataclass
class LinearAttentionState:
    kv_sum: torch.Tensor  # B x h x d x d, sum of phi(k)^T v, fp32
    k_sum: torch.Tensor   # B x h x d, sum of phi(k), fp32
    count: int

    def __add__(self, other: "LinearAttentionState") -> "LinearAttentionState":
        return LinearAttentionState(self.kv_sum + other.kv_sum, self.k_sum + other.k_sum, self.count + other.count)


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, heads: int) -> LinearAttentionState:
    kf = F.elu(_heads(k, heads)) + 1.0
    return LinearAttentionState(kf.transpose(-1, -2) @ _heads(v, heads), kf.sum(dim=-2), k.shape[1])


def apply_linear_attention_state(q: torch.Tensor, state: LinearAttentionState, heads: int) -> torch.Tensor:
    qf = F.elu(_heads(q, heads)) + 1.0
    z = qf @ (state.k_sum / state.count).unsqueeze(-1) + EPS
    out = (qf @ (state.kv_sum / state.count)) / z
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)

"""LinFusion's generalized linear attention on already-projected q, k, v (B x N x C each).

    Q = phi(q), K = phi(k), phi(u) = elu(u) + 1
    out = (Q @ S) / (Q @ mean(K)^T + 1e-4),   S = K^T V / N   (per head, d x d)

`linear_attention_reference` is the plain formula, written to be obviously right (the fla `naive.py`
habit). `linear_attention` is the fast path the models run: it never builds an N x N matrix, works on
token chunks so its extra memory is O(chunk * C) on top of the output, and accumulates the tiny
reductions (S, sum K) in fp32 whatever the input dtype.

The global state (sum K^T V, sum K, N) is additive over tokens, so it can be computed chunk by chunk,
tile by tile or device by device and merged exactly: `linear_attention_state`, `LinearAttentionState.merge`
(or `+`) and `apply_linear_attention_state` expose it for tiled sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Beside a *mean* over tokens, so the epsilon does not change with resolution (LinFusion's choice).
EPS = 1e-4
# Tokens processed at once. 16384 x 1280 channels in fp32 is 80 MiB per temporary: small next to the
# activations of a UNet level that large, and big enough that the matmuls run at full speed.
DEFAULT_CHUNK_SIZE = 16384


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The LinFusion formula exactly as written in the paper's code, in fp32, all tokens at once."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.float().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    n_kv = k.shape[2]
    z = q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) + EPS
    s = (k.transpose(-1, -2) * n_kv ** -0.5) @ (v * n_kv ** -0.5)
    out = (q @ s) / z
    return out.transpose(1, 2).reshape(b, n, c)


def _phi_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B x n x C (any dtype) -> phi(t) as fp32 B x heads x n x d (one fp32 copy of this chunk)."""
    b, n, c = t.shape
    t = t.reshape(b, n, heads, c // heads).transpose(1, 2).float()
    # .float() of an fp32 tensor is the same storage: elu is out of place, so +1 lands on its fresh output.
    return F.elu(t).add_(1.0)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2).float()


@dataclass
class LinearAttentionState:
    """The additive summary of keys and values: everything the output needs besides the queries.

    kv_sum: B x heads x d x d, sum over tokens of phi(k)^T v (fp32)
    k_sum:  B x heads x d,     sum over tokens of phi(k) (fp32)
    count:  number of tokens summed
    """
    kv_sum: torch.Tensor
    k_sum: torch.Tensor
    count: int

    def merge(self, other: "LinearAttentionState") -> "LinearAttentionState":
        if self.kv_sum.shape != other.kv_sum.shape:
            raise ValueError(f"cannot merge linear attention states of shapes {tuple(self.kv_sum.shape)} "
                             f"and {tuple(other.kv_sum.shape)}")
        return LinearAttentionState(self.kv_sum + other.kv_sum, self.k_sum + other.k_sum, self.count + other.count)

    __add__ = merge

    def to(self, device) -> "LinearAttentionState":
        return LinearAttentionState(self.kv_sum.to(device), self.k_sum.to(device), self.count)


def _check(q: torch.Tensor, heads: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"linear attention expects B x N x C tokens, got shape {tuple(q.shape)}")
    if q.shape[-1] % heads:
        raise ValueError(f"{q.shape[-1]} channels do not split into {heads} heads")


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, heads: int,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> LinearAttentionState:
    """Sum phi(k)^T v and phi(k) over the tokens of k, v (B x N x C), chunk by chunk, in fp32."""
    _check(k, heads)
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} have different token counts")
    b, n, c = k.shape
    d = c // heads
    kv_sum = torch.zeros(b, heads, d, v.shape[-1] // heads, dtype=torch.float32, device=k.device)
    k_sum = torch.zeros(b, heads, d, dtype=torch.float32, device=k.device)
    for start in range(0, n, chunk_size):
        kc = _phi_heads(k[:, start:start + chunk_size], heads)
        vc = _heads(v[:, start:start + chunk_size], heads)
        kv_sum.add_(kc.transpose(-1, -2) @ vc)
        k_sum.add_(kc.sum(dim=2))
    return LinearAttentionState(kv_sum, k_sum, n)


def apply_linear_attention_state(q: torch.Tensor, state: LinearAttentionState, heads: int,
                                 chunk_size: int = DEFAULT_CHUNK_SIZE, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attend queries q (B x N x C) to a key/value state; returns B x N x C in q's dtype."""
    _check(q, heads)
    b, n, c = q.shape
    if state.kv_sum.shape[:2] != (b, heads):
        raise ValueError(f"state for batch x heads {tuple(state.kv_sum.shape[:2])} does not fit queries "
                         f"of batch {b} with {heads} heads")
    # Divide the tiny sums once, not the big tensors: S = K^T V / N and mean(K).
    s = state.kv_sum / state.count
    k_mean = (state.k_sum / state.count).unsqueeze(-1)             # B x h x d x 1
    d_v = s.shape[-1]
    if out is None:
        out = torch.empty(b, n, heads * d_v, dtype=q.dtype, device=q.device)
    out_heads = out.view(b, n, heads, d_v)
    for start in range(0, n, chunk_size):
        qc = _phi_heads(q[:, start:start + chunk_size], heads)    # B x h x n x d, fp32
        num = qc @ s                                               # B x h x n x d_v
        num.div_((qc @ k_mean).add_(EPS))
        out_heads[:, start:start + chunk_size].copy_(num.transpose(1, 2))
    return out


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """LinFusion attention on projected q, k, v (B x N x C, any float dtype) -> B x N x C in q's dtype."""
    _check(q, heads)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} have different batch sizes")
    state = linear_attention_state(k, v, heads, chunk_size)
    return apply_linear_attention_state(q, state, heads, chunk_size)

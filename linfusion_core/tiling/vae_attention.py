"""Softmax attention of one query chunk against keys/values that arrive in chunks (online softmax).

The VAE's mid-block self-attention is global: every pixel attends to every other pixel. Tiling must not
change that, so each query tile sees all keys, but never more than one key chunk at a time: the score
block is (query chunk x key chunk), never N x N. Running max / sum / accumulator are fp32.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch


def online_softmax_attention(q: torch.Tensor, kv_chunks: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                             scale: float, query_chunk: int = 4096) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (n x C) against the concatenation of the (k, v) chunks (m_i x C).

    Keys are the outer loop so every key chunk is fetched once (it may come from CPU memory); queries
    are sliced so a score block is at most query_chunk x m_i.
    """
    q = q.float() * scale
    n = q.shape[0]
    running_max = torch.full((n, 1), float("-inf"), dtype=torch.float32, device=q.device)
    running_sum = torch.zeros((n, 1), dtype=torch.float32, device=q.device)
    acc = None
    for k, v in kv_chunks:
        k = k.to(q.device, torch.float32)
        v = v.to(q.device, torch.float32)
        if acc is None:
            acc = torch.zeros((n, v.shape[1]), dtype=torch.float32, device=q.device)
        for s in range(0, n, query_chunk):
            e = min(s + query_chunk, n)
            scores = q[s:e] @ k.T
            new_max = torch.maximum(running_max[s:e], scores.amax(dim=1, keepdim=True))
            probs = torch.exp(scores.sub_(new_max))
            correction = torch.exp(running_max[s:e] - new_max)
            running_sum[s:e] = running_sum[s:e] * correction + probs.sum(dim=1, keepdim=True)
            acc[s:e] = acc[s:e] * correction + probs @ v
            running_max[s:e] = new_max
            del scores, probs
    if acc is None:
        raise ValueError("attention over an empty set of keys")
    return acc / running_sum


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain formula (materialises n x m scores), in fp32 or wider: for tests only."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return torch.softmax(q @ k.T * scale, dim=1) @ v

"""LinFusion's generalized linear attention on already-projected q, k, v (B x N x C each).

    Q = phi(q), K = phi(k), phi(u) = elu(u) + 1
    out = (Q @ S) / (Q @ mean(K)^T + 1e-4),   S = K^T V / N   (per head, d x d)

`linear_attention_reference` is the plain formula, written to be obviously right (the fla `naive.py`
habit). `linear_attention` is the fast path the models run: it never builds an N x N matrix, works on
token chunks so its extra memory is O(chunk * C) on top of the output, and accumulates the tiny
reductions (S, sum K) in fp32 whatever the input dtype. Blocks group whole images while they fit in a
chunk (`token_blocks`), so at small N a call is a handful of batched ops, not a loop over images.

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
    """The LinFusion formula, plainly, in fp32, all tokens at once.

    It follows the official GeneralizedLinearAttention.forward (Huage001/LinFusion, src/linfusion/attention.py)
    with one deliberate difference: the official code scales K^T V by the *query* count
    (`sequence_length` of hidden_states, split as N^-0.5 on K and on V), while mean(K) in the normaliser is
    over the keys; here both use the *key* count N_kv. LinFusion replaces only self-attention, where queries
    and keys are the same tokens, so the two are identical there. They part only when a caller hands the
    module fewer queries than keys: HyperTile (tiles of queries against the whole image) and our tiled UNet
    (one tile's queries against the state summed over all tiles). Dividing by the query count would then
    scale K^T V by N_kv / N_q against the normaliser (x4 for HyperTile's 2 x 2 tiles); by the key count, the
    result equals the untiled self-attention, which is what the paper's model computes at that size."""
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


def is_compiling() -> bool:
    """Inside torch.compile's tracing (Dynamo): out= into strided views is eager-only."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else torch._dynamo.is_compiling()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def phi_(t: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1, in place. On a CPU as exp(min(t, 0)) + max(t, 0), the same function (equal up to
    one rounding of exp against expm1 + 1): torch's CPU elu runs a scalar expm1, several times slower than its
    vectorised exp, enough to cost more than the state GEMMs at small N. A GPU's elu is one fused pass."""
    if t.device.type != "cpu":
        return F.elu_(t).add_(1.0)
    low = t.clamp_max(0.0).exp_()
    return t.clamp_min_(0.0).add_(low)


def _phi_rows(t: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Tokens (... x n x C, any dtype) -> phi(t) = elu(t) + 1 in fp32, same shape.

    In place whenever the fp32 tensor is ours to change: a fresh fp32 copy of half input, or `overwrite`
    (the caller hands over a fresh projection). Never in place on a caller's tensor or when autograd
    would need the overwritten values."""
    t32 = t.float()
    if _needs_grad(t):
        return F.elu(t32) + 1.0
    if t32 is not t or overwrite:
        return phi_(t32)
    return phi_(t32.clone())


def token_blocks(batch: int, tokens: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """How B x N tokens are cut into blocks of at most `chunk` tokens: (first image, end image, first token,
    end token). Whole images are grouped while they fit (the whole batch at once at small N: one GEMM per
    layer, nothing dispatched per image); an image larger than a chunk is cut along its tokens. Every block
    x[i0:i1, t0:t1] of a contiguous batch is contiguous, so the Linear layers never copy their input."""
    if tokens <= chunk:
        per = max(1, chunk // max(tokens, 1))
        return [(i, min(i + per, batch), 0, tokens) for i in range(0, batch, per)]
    return [(i, i + 1, t, min(t + chunk, tokens)) for i in range(batch) for t in range(0, tokens, chunk)]


def _head_batches(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """g x n x C (or n x C) -> (g*heads) x n x d for batched GEMMs. One image: a strided view (bmm reads it in
    place); several: one copy into head-major order (a pass over the block, small next to its projections)."""
    if rows.dim() == 2 or rows.shape[0] == 1:
        rows = rows.reshape(rows.shape[-2], rows.shape[-1])
        return rows.unflatten(-1, (heads, rows.shape[-1] // heads)).transpose(0, 1)
    g, n, c = rows.shape
    return rows.view(g, n, heads, c // heads).transpose(1, 2).reshape(g * heads, n, c // heads)


def block_state(k_rows: torch.Tensor, v_rows: torch.Tensor, heads: int, overwrite: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The state sums of a block of keys/values (g x n x C each, or n x C for one image): sum phi(k)^T v
    (g x h x d x d_v) and sum phi(k) (g x h x d), in fp32. phi runs on all channels at once before the head
    split; the per-head K^T V of every image is one batched GEMM. `overwrite`: k_rows may be changed in place."""
    k_phi = _phi_rows(k_rows, overwrite)
    v32 = v_rows.float()
    g = 1 if k_phi.dim() == 2 else k_phi.shape[0]
    c, c_v = k_phi.shape[-1], v32.shape[-1]
    kv = torch.bmm(_head_batches(k_phi, heads).transpose(-1, -2), _head_batches(v32, heads))
    k_sum = k_phi.sum(dim=-2).view(g, heads, c // heads)
    return kv.view(g, heads, c // heads, c_v // heads), k_sum


def accumulate_state_rows(kv_sum: torch.Tensor, k_sum: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                          heads: int, overwrite: bool = False) -> None:
    """Add a block of keys/values (g x n x C each, or n x C) to the state of its g images (kv_sum
    g x h x d x d_v, k_sum g x h x d; or h x d x d_v and h x d for one image)."""
    kv, ks = block_state(k_rows, v_rows, heads, overwrite)
    kv_sum.add_(kv.view_as(kv_sum))
    k_sum.add_(ks.view_as(k_sum))


def normalized_state(state: "LinearAttentionState") -> torch.Tensor:
    """B x h x d x (d_v + 1): [K^T V / N | mean(K)]. Dividing the tiny sums once, not the big tensors; mean(K)
    rides along as one extra column so numerator and normaliser come from a single GEMM over the queries."""
    return torch.cat([state.kv_sum, state.k_sum.unsqueeze(-1)], dim=-1) / state.count


def attend_rows(q_rows: torch.Tensor, s_aug: torch.Tensor, heads: int, out_rows: torch.Tensor,
                overwrite: bool = False) -> torch.Tensor:
    """A block of queries (g x n x C, or n x C for one image) against its images' normalized states
    (g x h x d x (d_v + 1), or h x d x (d_v + 1)), written into out_rows (q's shape with h*d_v channels, any
    float dtype). `overwrite`: q_rows may be changed in place (even when out_rows is q_rows itself)."""
    d_v = s_aug.shape[-1] - 1
    q_phi = _phi_rows(q_rows, overwrite)
    g = 1 if q_phi.dim() == 2 else q_phi.shape[0]
    num = torch.bmm(_head_batches(q_phi, heads), s_aug.reshape(g * heads, -1, d_v + 1))   # (g*h) x n x (d_v+1)
    out_heads = out_rows.unflatten(-1, (heads, d_v)).transpose(-3, -2)       # a strided view: (g x) h x n x d_v
    num = num.view(*out_heads.shape[:-1], d_v + 1)
    if _needs_grad(num, out_rows) or is_compiling():
        # (Dynamo cannot trace out= into a strided view; the compiler fuses these into one pass anyway.)
        out_heads.copy_(num[..., :d_v] / (num[..., d_v:] + EPS))
    else:
        # Divide, merge heads and cast to the output dtype in one pass.
        torch.div(num[..., :d_v], num[..., d_v:].add_(EPS), out=out_heads)
    return out_rows


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

    def repeat_interleave(self, repeats: int) -> "LinearAttentionState":
        """One copy per query group: HyperTile folds tiles into the batch ((b tiles) x n x C) while its keys
        stay per image; every tile of an image then attends to that image's whole-canvas state."""
        return LinearAttentionState(self.kv_sum.repeat_interleave(repeats, dim=0),
                                    self.k_sum.repeat_interleave(repeats, dim=0), self.count)

    def to(self, device) -> "LinearAttentionState":
        return LinearAttentionState(self.kv_sum.to(device), self.k_sum.to(device), self.count)


def _check(q: torch.Tensor, heads: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"linear attention expects B x N x C tokens, got shape {tuple(q.shape)}")
    if q.shape[-1] % heads:
        raise ValueError(f"{q.shape[-1]} channels do not split into {heads} heads")


def state_by_blocks(batch: int, tokens: int, heads: int, chunk: int, kv_rows, overwrite: bool = False
                    ) -> LinearAttentionState:
    """The state of B x N tokens, block by block (`token_blocks`): kv_rows(i0, i1, t0, t1) gives one block's
    keys and values (g x n x C each; the module projects them there, so no projection of the whole canvas
    exists at once). One block: its sums as they are; more: added into fp32 accumulators. `overwrite`: the
    blocks kv_rows returns are fresh, phi may work in their storage."""
    blocks = token_blocks(batch, tokens, chunk)
    if len(blocks) == 1:
        return LinearAttentionState(*block_state(*kv_rows(*blocks[0]), heads, overwrite), tokens)
    kv_sum = k_sum = None
    for i0, i1, t0, t1 in blocks:
        k_rows, v_rows = kv_rows(i0, i1, t0, t1)
        if kv_sum is None:
            d, d_v = k_rows.shape[-1] // heads, v_rows.shape[-1] // heads
            kv_sum = torch.zeros(batch, heads, d, d_v, dtype=torch.float32, device=k_rows.device)
            k_sum = torch.zeros(batch, heads, d, dtype=torch.float32, device=k_rows.device)
        accumulate_state_rows(kv_sum[i0:i1], k_sum[i0:i1], k_rows, v_rows, heads, overwrite)
    return LinearAttentionState(kv_sum, k_sum, tokens)


def rows_by_blocks(batch: int, tokens: int, chunk: int, block_rows) -> torch.Tensor:
    """B x N x C_out assembled block by block: block_rows(i0, i1, t0, t1) -> that block's output rows. One
    block: its output as it is, no copy."""
    blocks = token_blocks(batch, tokens, chunk)
    if len(blocks) == 1:
        return block_rows(*blocks[0])
    out = None
    for i0, i1, t0, t1 in blocks:
        part = block_rows(i0, i1, t0, t1)
        if out is None:
            out = torch.empty(batch, tokens, part.shape[-1], dtype=part.dtype, device=part.device)
        out[i0:i1, t0:t1] = part
    return out


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, heads: int,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> LinearAttentionState:
    """Sum phi(k)^T v and phi(k) over the tokens of k, v (B x N x C), chunk by chunk, in fp32."""
    _check(k, heads)
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} have different token counts")
    return state_by_blocks(k.shape[0], k.shape[1], heads, chunk_size,
                           lambda i0, i1, t0, t1: (k[i0:i1, t0:t1], v[i0:i1, t0:t1]))


def apply_linear_attention_state(q: torch.Tensor, state: LinearAttentionState, heads: int,
                                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Attend queries q (B x N x C) to a key/value state; returns B x N x C in q's dtype."""
    _check(q, heads)
    b, n, c = q.shape
    if state.kv_sum.shape[:2] != (b, heads):
        raise ValueError(f"state for batch x heads {tuple(state.kv_sum.shape[:2])} does not fit queries "
                         f"of batch {b} with {heads} heads")
    s_aug = normalized_state(state)
    c_out = heads * (s_aug.shape[-1] - 1)

    def block_rows(i0, i1, t0, t1):
        rows = q[i0:i1, t0:t1]
        return attend_rows(rows, s_aug[i0:i1], heads, rows.new_empty(*rows.shape[:-1], c_out))
    return rows_by_blocks(b, n, chunk_size, block_rows)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """LinFusion attention on projected q, k, v (B x N x C, any float dtype) -> B x N x C in q's dtype."""
    _check(q, heads)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} have different batch sizes")
    state = linear_attention_state(k, v, heads, chunk_size)
    return apply_linear_attention_state(q, state, heads, chunk_size)

"""One LinFusion self-attention module: its weights and its forward pass.

Submodule names are those of the released files (`to_q`, `to_k`, `to_v`, `to_out.0`, `to_q_.{0,1,3}`,
`to_k_.{0,1,3}`), so a file's per-module state dict loads with `load_state_dict` as it is.
Layers come from `comfy.ops`, so ComfyUI's weight casting, low-VRAM offload and fp8 storage apply to
them exactly as to the UNet's own layers.
"""
from __future__ import annotations

import torch
from torch import nn

from . import fast_path
from .reference import (DEFAULT_CHUNK_SIZE, LinearAttentionState, attend_rows, normalized_state, rows_by_blocks,
                        state_by_blocks)


def default_operations():
    import comfy.ops
    return comfy.ops.disable_weight_init


def _projection_mlp(dim: int, mid_dim: int, dtype, device, operations) -> nn.Module:
    """x -> Linear -> LayerNorm -> LeakyReLU -> Linear (`to_q_` / `to_k_`). For -1 the official code uses
    nn.Identity, so the input is doubled (x + to_q_(x) = 2x); we keep that, the weights were trained so."""
    if mid_dim == -1:
        return nn.Identity()
    return nn.Sequential(
        operations.Linear(dim, mid_dim, dtype=dtype, device=device),
        operations.LayerNorm(mid_dim, dtype=dtype, device=device),
        nn.LeakyReLU(0.01, inplace=True),   # on LayerNorm's fresh output, which its backward does not need
        operations.Linear(mid_dim, dim, dtype=dtype, device=device),
    )


class LinFusionAttention(nn.Module):
    """Generalized linear attention replacing one UNet `attn1` (LinFusion, arXiv 2409.02097).

    dim: channels C; heads: number of heads (d = C / heads);
    projection_mid_dim: hidden width of the q/k MLPs (None means C, -1 means no MLP).

    Two paths, one function. A plain self-attention call without autograd runs `fast_path` (packed, folded
    weights, a handful of ops for the whole batch), from the layers' own weights or, for layers ComfyUI casts
    per call (DynamicVRAM, low VRAM, LoRA), from the weights the cast gives while it gives the same ones each
    call. Everything else runs the reference path below (the module's own layers over attention/reference.py's
    block loop): keys/values other than the queries (HyperTile, tiles), an explicit chunk size (Low-Memory
    Mode) or a call too large for one pass, autograd, layers whose casts are new tensors every call. `compute_state` and
    `attend` (tiled UNet) are always the reference path. `fast_path = False` turns the fast one off.
    """

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None, dtype=None, device=None,
                 operations=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LinFusion module with {dim} channels cannot have {heads} heads")
        operations = operations or default_operations()
        mid = dim if projection_mid_dim is None else int(projection_mid_dim)
        self.dim, self.heads, self.projection_mid_dim = dim, heads, projection_mid_dim
        # Tokens per block of the reference path; None: DEFAULT_CHUNK_SIZE there, and the fast path up to its
        # own bound. Set (or passed as chunk_size), it bounds both paths' temporaries.
        self.chunk_size: int | None = None
        self.fast_path = True
        self._linfusion_packed = None   # fast_path.PackedWeights, built on first use
        self._linfusion_misses = 0      # calls in a row whose cast layers gave new tensors (fast_path.forward)
        self._linfusion_streamed = False
        self.to_q = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = nn.Sequential(operations.Linear(dim, dim, dtype=dtype, device=device), nn.Dropout(0.0))
        self.to_q_ = _projection_mlp(dim, mid, dtype, device, operations)
        self.to_k_ = _projection_mlp(dim, mid, dtype, device, operations)

    def _chunk(self, chunk_size: int | None) -> int:
        return chunk_size or self.chunk_size or DEFAULT_CHUNK_SIZE

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cpu(): the packed copy is rebuilt on the next call, never kept on the old device.
        self._linfusion_packed = None
        return super()._apply(fn, *args, **kwargs)

    def _fast(self, x: torch.Tensor, context, value, chunk_size: int | None) -> torch.Tensor | None:
        """The fast path's output, or None where the reference path must run."""
        if not self.fast_path or (context is not None and context is not x) or (value is not None and value is not x):
            return None
        if x.dim() != 3 or x.shape[-1] != self.dim or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        if not fast_path.fast_path_fits(x, chunk_size or self.chunk_size):
            return None
        return fast_path.forward(self, x)

    @staticmethod
    def _plus_mlp(t: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        """t + mlp(t), adding into the MLP's fresh output when nothing needs the values it replaces."""
        h = mlp(t)
        if h is t or (torch.is_grad_enabled() and (t.requires_grad or h.requires_grad)):
            return t + h   # Identity (projection_mid_dim -1) returns t itself: never change the caller's tensor
        return h.add_(t)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(self._plus_mlp(x, self.to_q_))

    def project_k(self, context: torch.Tensor) -> torch.Tensor:
        return self.to_k(self._plus_mlp(context, self.to_k_))

    def compute_state(self, context: torch.Tensor, value: torch.Tensor | None = None,
                      chunk_size: int | None = None) -> LinearAttentionState:
        """The additive key/value state of these tokens (merge states of tiles with `+`)."""
        value = context if value is None else value
        if context.shape[:2] != value.shape[:2]:
            raise ValueError(f"LinFusion: keys {tuple(context.shape)} and values {tuple(value.shape)} have "
                             f"different token counts")
        # Blocks of whole images while they fit in a chunk (at small N the whole batch in one pass: a few
        # batched ops per call, not a loop over images), token chunks of one image beyond: the MLP activations
        # of a 16K canvas never exist at once. The projections are fresh, so phi may overwrite them.
        return state_by_blocks(context.shape[0], context.shape[1], self.heads, self._chunk(chunk_size),
                               lambda i0, i1, t0, t1: (self.project_k(context[i0:i1, t0:t1]),
                                                       self.to_v(value[i0:i1, t0:t1])), overwrite=True)

    def attend(self, x: torch.Tensor, state: LinearAttentionState, chunk_size: int | None = None) -> torch.Tensor:
        """Queries from x attend to a (possibly merged) state; returns the module output for x."""
        b, n, _ = x.shape
        if state.kv_sum.shape[:2] != (b, self.heads):
            raise ValueError(f"LinFusion: state for batch x heads {tuple(state.kv_sum.shape[:2])} does not fit "
                             f"queries of batch {b} with {self.heads} heads")
        s_aug = normalized_state(state)

        def block_rows(i0, i1, t0, t1):
            q = self.project_q(x[i0:i1, t0:t1])
            # q is a fresh projection: phi and the division land in its own storage when dtypes allow.
            out = q if not torch.is_grad_enabled() else torch.empty_like(q)
            return self.to_out(attend_rows(q, s_aug[i0:i1], self.heads, out, overwrite=True))
        return rows_by_blocks(b, n, self._chunk(chunk_size), block_rows)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                chunk_size: int | None = None, **kwargs) -> torch.Tensor:
        """chunk_size: tokens per chunk (None: the module's default); it bounds the temporaries, not the result."""
        fast = self._fast(x, context, value, chunk_size)
        if fast is not None:
            return fast
        # attn1_patch users (HyperTile, ...) pass context and value explicitly: keys from context,
        # values from value, exactly as ComfyUI's CrossAttention does.
        context = x if context is None else context
        value = context if value is None else value
        state = self.compute_state(context, value, chunk_size)
        if context.shape[0] != x.shape[0]:
            # HyperTile tiles only the queries, folding tiles into the batch. Linear attention needs no
            # tiling (each query only reads the global state), so each tile gets its image's full state:
            # the result is exactly LinFusion on the untiled canvas.
            if x.shape[0] % context.shape[0]:
                raise ValueError(f"LinFusion: {x.shape[0]} query rows cannot be grouped over {context.shape[0]} "
                                 f"key/value rows")
            state = state.repeat_interleave(x.shape[0] // context.shape[0])
        return self.attend(x, state, chunk_size)

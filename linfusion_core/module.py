"""One LinFusion self-attention module: its weights and its forward pass.

Submodule names are those of the released files (`to_q`, `to_k`, `to_v`, `to_out.0`, `to_q_.{0,1,3}`,
`to_k_.{0,1,3}`), so a file's per-module state dict loads with `load_state_dict` as it is.
Layers come from `comfy.ops`, so ComfyUI's weight casting, low-VRAM offload and fp8 storage apply to
them exactly as to the UNet's own layers.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import DEFAULT_CHUNK_SIZE, LinearAttentionState, apply_linear_attention_state, linear_attention_state


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
        nn.LeakyReLU(0.01),
        operations.Linear(mid_dim, dim, dtype=dtype, device=device),
    )


class LinFusionAttention(nn.Module):
    """Generalized linear attention replacing one UNet `attn1` (LinFusion, arXiv 2409.02097).

    dim: channels C; heads: number of heads (d = C / heads);
    projection_mid_dim: hidden width of the q/k MLPs (None means C, -1 means no MLP).
    """

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None, dtype=None, device=None,
                 operations=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LinFusion module with {dim} channels cannot have {heads} heads")
        operations = operations or default_operations()
        mid = dim if projection_mid_dim is None else int(projection_mid_dim)
        self.dim, self.heads, self.projection_mid_dim = dim, heads, projection_mid_dim
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.to_q = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = nn.Sequential(operations.Linear(dim, dim, dtype=dtype, device=device), nn.Dropout(0.0))
        self.to_q_ = _projection_mlp(dim, mid, dtype, device, operations)
        self.to_k_ = _projection_mlp(dim, mid, dtype, device, operations)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x + self.to_q_(x))

    def project_k(self, context: torch.Tensor) -> torch.Tensor:
        return self.to_k(context + self.to_k_(context))

    def compute_state(self, context: torch.Tensor, value: torch.Tensor | None = None) -> LinearAttentionState:
        """The additive key/value state of these tokens (merge states of tiles with `+`)."""
        value = context if value is None else value
        state = None
        # Project chunk by chunk: the MLP activations of a 16K canvas never exist all at once.
        for start in range(0, context.shape[1], self.chunk_size):
            end = start + self.chunk_size
            part = linear_attention_state(self.project_k(context[:, start:end]), self.to_v(value[:, start:end]),
                                          self.heads, self.chunk_size)
            state = part if state is None else state + part
        return state

    def attend(self, x: torch.Tensor, state: LinearAttentionState) -> torch.Tensor:
        """Queries from x attend to a (possibly merged) state; returns the module output for x."""
        out = None
        for start in range(0, x.shape[1], self.chunk_size):
            end = start + self.chunk_size
            attn = apply_linear_attention_state(self.project_q(x[:, start:end]), state, self.heads, self.chunk_size)
            part = self.to_out(attn)
            if out is None:
                if end >= x.shape[1]:
                    return part
                out = torch.empty(x.shape[0], x.shape[1], part.shape[-1], dtype=part.dtype, device=part.device)
            out[:, start:end] = part
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        # attn1_patch users (HyperTile, ...) pass context and value explicitly: keys from context,
        # values from value, exactly as ComfyUI's CrossAttention does.
        context = x if context is None else context
        value = context if value is None else value
        return self.attend(x, self.compute_state(context, value))

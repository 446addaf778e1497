"""One self-attention (attn1) call: the extension's LinFusionAttention against ComfyUI's CrossAttention with
each softmax backend, chosen per call through ComfyUI's documented override
(transformer_options["optimized_attention_override"]), so each backend runs as inside a ComfyUI UNet.
Every backend at a size gets the same number of runs; a call predicted past the limit is skipped.
"""
from __future__ import annotations

import logging

import torch

from .models import fill_random
from .timing import measure, predict

log = logging.getLogger("LinFusion")
BATCH, HEADS = 2, 8                    # cond + uncond; SD1.5's heads
# Latent sides s: N = s^2 tokens, level 0 of SD1.5 at 8s px (wider layers meet them at 2x, 4x the side).
CPU_SIDES = {320: [32, 48, 64, 96, 128, 192, 256, 384, 512], 640: [32, 48, 64, 96, 128, 192, 256],
             1280: [16, 24, 32, 48, 64, 96, 128]}
GPU_SIDES = {c: [16, 32, 48, 64, 96, 128, 192, 256, 384, 512] for c in (320, 640, 1280)}
QUICK_SIDES = {320: [16, 32, 48]}
SMOKE_SIDES = {320: [8, 16]}           # the GPU plan's dtypes on a CPU: half-precision matmuls are slow there


def linfusion_flops(batch: int, tokens: int, dim: int, heads: int, mid_dim: int | None = None) -> float:
    """to_q/k/v/out 8NC^2, the two C -> m -> C query/key MLPs 8NCm, phi(K)^T V and Q S 4NCd (+2NC)."""
    mlp = 0 if mid_dim == -1 else 8.0 * tokens * dim * (mid_dim or dim)
    return batch * (8.0 * tokens * dim * dim + mlp + 4.0 * tokens * dim * (dim // heads) + 2.0 * tokens * dim)


def softmax_flops(batch: int, tokens: int, dim: int) -> float:
    """q/k/v/out projections 8NC^2 plus Q K^T and P V 4N^2C."""
    return batch * (8.0 * tokens * dim * dim + 4.0 * tokens * tokens * dim)


def backends(device: torch.device) -> dict:
    """ComfyUI's softmax attention functions worth comparing on this device."""
    import comfy.ldm.modules.attention as attn

    found = {"sdpa": attn.attention_pytorch}
    if device.type == "cpu":
        found["sub_quad"] = attn.attention_sub_quad          # ComfyUI's default on a CPU
    else:
        for name in ("flash", "sage"):
            func = attn.get_attention_function(name, default=None)
            if func is not None:
                found[name] = func
    return found


def run(core, device, dtype, sides_by_width: dict, n: int, budget, max_call_s: float) -> list[dict]:
    import comfy.ldm.modules.attention as attn
    import comfy.ops

    rows, funcs = [], backends(device)
    for dim, sides in sides_by_width.items():
        lin = fill_random(core.module.LinFusionAttention(dim, HEADS, None)).to(device, dtype).eval()
        soft = fill_random(attn.CrossAttention(dim, heads=HEADS, dim_head=dim // HEADS, dtype=dtype,
                                               operations=comfy.ops.disable_weight_init)).to(device, dtype)
        last = {}
        for side in sides:
            tokens = side * side
            x = torch.randn(BATCH, tokens, dim, device=device, dtype=dtype)
            for name in ["linfusion", *funcs]:
                row = {"dim": dim, "tokens": tokens, "backend": name, "dtype": str(dtype).split(".")[-1],
                       "flops": linfusion_flops(BATCH, tokens, dim, HEADS) if name == "linfusion"
                       else softmax_flops(BATCH, tokens, dim)}
                guess = predict(last.get(name), tokens, 1 if name == "linfusion" else 2)
                skip = budget.refuse(guess, n + 1, max_call_s)
                if skip:
                    rows.append({**row, **skip})
                    continue
                if name == "linfusion":
                    fn = lambda: lin(x)
                else:
                    opts = {"optimized_attention_override": lambda _d, *a, f=funcs[name], **kw: f(*a, **kw)}
                    fn = lambda: soft(x, transformer_options=opts)
                try:
                    row.update(measure(fn, device, n))
                except torch.OutOfMemoryError as e:
                    row["skipped"] = f"out of memory ({str(e).splitlines()[0][:60]})"
                rows.append(row)
                if "median_s" in row:
                    last[name] = (tokens, row["median_s"])
                log.info("[LinFusion] bench attn1 C=%d N=%d %s %s: %s", dim, tokens, name, row["dtype"],
                         row.get("skipped") or f"{row['median_s']:.4f} s")
            del x
    return rows

"""One self-attention (attn1) call: the extension's LinFusionAttention against ComfyUI's CrossAttention with
each softmax backend, chosen per call through ComfyUI's documented override
(transformer_options["optimized_attention_override"]), so each backend runs as inside a ComfyUI UNet.
The backends at a size run interleaved after one warm-up call each at that size (timing.interleaved), the
same number of times; a call predicted past the limit is skipped.

Two layouts: SD 1.5's (8 heads, LinFusion-1-5's C-wide query/key MLPs) and SDXL's (64-channel heads,
LinFusion-XL's C/16-wide MLPs), each at its own UNet's widths and token counts.
"""
from __future__ import annotations

import logging

import torch

from .models import filled
from .timing import interleaved, predict

log = logging.getLogger("LinFusion")
BATCH = 2                              # cond + uncond
# heads and LinFusion MLP width of a layout at width C (None: C wide, as LinFusion-1-5).
LAYOUTS = {"sd15": lambda dim: (8, None), "sdxl": lambda dim: (dim // 64, dim // 16)}
LEVEL = {320: 0, 640: 1, 1280: 2}      # the UNet level of each width: its latent side is px / 8 / 2^level
# Latent sides s at each width: N = s^2 tokens, met at 8 * 2^level * s px.
CPU_SIDES = {"sd15": {320: [32, 48, 64, 96, 128, 192, 256, 384, 512], 640: [32, 48, 64, 96, 128, 192, 256],
                      1280: [16, 24, 32, 48, 64, 96, 128]},
             "sdxl": {640: [32, 64, 128], 1280: [16, 32, 64]}}          # SDXL at 512, 1024 and 2048 px
GPU_SIDES = {"sd15": {c: [16, 32, 48, 64, 96, 128, 192, 256, 384, 512] for c in (320, 640, 1280)},
             "sdxl": {640: [32, 64, 128, 256, 512], 1280: [16, 32, 64, 128, 256]}}   # 512 px to 8K
QUICK_SIDES = {"sd15": {320: [16, 32, 48]}, "sdxl": {640: [8, 16]}}
SMOKE_SIDES = {"sd15": {320: [8, 16]}, "sdxl": {640: [8]}}   # the GPU plan's dtypes on a CPU: half matmuls are slow there


def pixels(dim: int, side: int) -> int:
    """The image side (px) at which a UNet level of this width has side x side tokens."""
    return side * 8 * 2 ** LEVEL.get(dim, 0)


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


def run(core, device, dtype, sides_by_layout: dict, n: int, budget, max_call_s: float) -> list[dict]:
    import comfy.ldm.modules.attention as attn
    import comfy.ops

    rows, funcs = [], backends(device)
    for family, sides_by_width in sides_by_layout.items():
        for dim, sides in sides_by_width.items():
            heads, mid = LAYOUTS[family](dim)
            lin = filled(lambda: core.attention.module.LinFusionAttention(dim, heads, mid)).to(device, dtype).eval()
            soft = filled(lambda: attn.CrossAttention(dim, heads=heads, dim_head=dim // heads, dtype=dtype,
                                                      operations=comfy.ops.disable_weight_init)).to(device, dtype)
            last = {}
            for side in sides:
                tokens = side * side
                x = torch.randn(BATCH, tokens, dim, device=device, dtype=dtype)
                fns, todo = {}, {}
                for name in ["linfusion", *funcs]:
                    row = {"family": family, "dim": dim, "heads": heads, "mid_dim": mid or dim, "tokens": tokens,
                           "px": pixels(dim, side), "backend": name, "dtype": str(dtype).split(".")[-1],
                           "flops": linfusion_flops(BATCH, tokens, dim, heads, mid) if name == "linfusion"
                           else softmax_flops(BATCH, tokens, dim)}
                    guess = predict(last.get(name), tokens, 1 if name == "linfusion" else 2)
                    skip = budget.refuse(guess, n + 1, max_call_s)
                    if skip:
                        rows.append({**row, **skip})
                        continue
                    if name == "linfusion":
                        fns[name] = lambda: lin(x)
                    else:
                        opts = {"optimized_attention_override": lambda _d, *a, f=funcs[name], **kw: f(*a, **kw)}
                        fns[name] = lambda opts=opts: soft(x, transformer_options=opts)
                    todo[name] = row
                try:
                    measured = interleaved(fns, device, n) if fns else {}
                except torch.OutOfMemoryError as e:
                    measured = {name: {"skipped": f"out of memory ({str(e).splitlines()[0][:60]})"} for name in fns}
                for name, res in measured.items():
                    row = dict(todo[name], **res, interleaved=list(fns))
                    rows.append(row)
                    if "median_s" in row:
                        last[name] = (tokens, row["median_s"])
                    log.info("[LinFusion] bench attn1 %s C=%d N=%d %s %s: %s", family, dim, tokens, name, row["dtype"],
                             row.get("skipped") or f"{row['median_s']:.4f} s")
                del x
    return rows

"""Section 1: one attn1 call, LinFusion's module against ComfyUI's own softmax attention backends.

The baseline is ComfyUI's real CrossAttention (to_q/to_k/to_v, the backend, to_out) with the backend
chosen through ComfyUI's documented per-call override (transformer_options
"optimized_attention_override"), so each backend runs exactly as inside a ComfyUI UNet.
Token counts are (P/8)^2 for P = 256 ... 4096 px: the first UNet level of SD1.5 at that size (C = 640 and
1280 see the same counts at 2x and 4x the pixel size).
"""
from __future__ import annotations

import logging

import psutil
import torch

from .linfusion_adapter import build_linfusion_attention, linfusion_attn1_flops
from .measure import Skipped, measure
from .random_weights import fill_variance_preserving

log = logging.getLogger("LinFusion")

BATCH = 2                      # cond + uncond, as every CFG sampling step
HEADS = 8                      # SD1.5
# 128 and 192 px only matter as the mid block's token counts (1/64 of level 0) at 1024 and 1536 px.
TOKENS = [(p // 8) ** 2 for p in (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)]
QUICK_TOKENS = [(p // 8) ** 2 for p in (256, 384, 512)]
# Widths and the token counts each one meets in SD1.5 from 512 to 4096 px (level 0, 1, 2 and mid).
WIDTH_TOKENS = {320: (1024, 262144), 640: (1024, 65536), 1280: (256, 16384)}


def softmax_attn1_flops(batch: int, tokens: int, dim: int) -> float:
    """q/k/v/out projections (8 N C^2) plus Q K^T and P V (4 N^2 C)."""
    return batch * (8.0 * tokens * dim * dim + 4.0 * tokens * tokens * dim)


def comfy_backends(device: torch.device) -> dict:
    """ComfyUI's attention functions that can run on this device, by a short name."""
    import comfy.ldm.modules.attention as attn

    backends = {"sdpa": attn.attention_pytorch, "sub_quad": attn.attention_sub_quad,
                "split": attn.attention_split, "basic": attn.attention_basic}
    if device.type == "cuda":
        for name in ("flash", "sage", "xformers"):
            func = attn.get_attention_function(name, default=None)
            if func is not None:
                backends[name] = func
    return backends


def default_backend_name() -> str:
    import comfy.ldm.modules.attention as attn
    return attn.optimized_attention.__name__


def override(func):
    """A transformer_options override that runs `func` instead of ComfyUI's default attention."""
    def run(_default, *args, **kwargs):
        return func(*args, **kwargs)
    return run


def comfy_cross_attention(dim: int, heads: int, device: torch.device, dtype: torch.dtype):
    import comfy.ldm.modules.attention as attn
    import comfy.ops

    module = attn.CrossAttention(dim, heads=heads, dim_head=dim // heads, dtype=dtype,
                                 operations=comfy.ops.disable_weight_init)
    return fill_variance_preserving(module).to(device)


def _quadratic_bytes(tokens: int, heads: int) -> float:
    """The N x N score matrix (and its softmax copy) that attention_basic materialises."""
    return 2.0 * BATCH * heads * tokens * tokens * 4


def run(core, device: torch.device, remeasure_gemm, *, quick: bool, max_call_s: float,
        dtype=torch.float32) -> list[dict]:
    """attn1 rows; `remeasure_gemm()` runs before each width, because on a shared machine the GEMM
    throughput itself drifts and % GEMM is taken against the best of those measurements (summary.py)."""
    rows = []
    widths = [320] if quick else list(WIDTH_TOKENS)
    backends = comfy_backends(device)
    for dim in widths:
        remeasure_gemm()
        lo, hi = WIDTH_TOKENS[dim]
        tokens_list = [n for n in (QUICK_TOKENS if quick else TOKENS) if lo <= n <= hi]
        modules = {"linfusion": build_linfusion_attention(core, dim, HEADS, None, device, dtype)}
        baseline = comfy_cross_attention(dim, HEADS, device, dtype)
        for name in backends:
            modules[name] = baseline
        last = {}                                   # name -> (tokens, seconds) of the last measurement
        for tokens in tokens_list:
            x = torch.randn(BATCH, tokens, dim, device=device, dtype=dtype)
            for name, module in modules.items():
                row = {"dim": dim, "tokens": tokens, "backend": name, "batch": BATCH, "heads": HEADS}
                linear = name == "linfusion"
                row["flops"] = (linfusion_attn1_flops(BATCH, tokens, dim, HEADS, dim) if linear
                                else softmax_attn1_flops(BATCH, tokens, dim))
                result = _one(module, name, x, tokens, last, device, max_call_s, quick, linear, backends)
                row.update(result.as_dict())
                if not isinstance(result, Skipped):
                    last[name] = (tokens, result.median_s)
                    row["reps"] = len(result.times_s)
                rows.append(row)
                log.info("[LinFusion] bench attn1 C=%d N=%d %s: %s", dim, tokens, name,
                         row.get("skipped") or f"{row['median_s']:.4f} s")
            del x
    return rows


def _one(module, name, x, tokens, last, device, max_call_s, quick, linear, backends):
    if module is None:
        return Skipped("LinFusion core module not available")
    if name == "basic" and device.type == "cpu":
        need = _quadratic_bytes(tokens, HEADS)
        free = psutil.virtual_memory().available
        if need > 0.25 * free:
            return Skipped(f"N x N scores need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    predicted = None
    if name in last:
        prev_tokens, prev_s = last[name]
        predicted = prev_s * (tokens / prev_tokens) ** (1 if linear else 2)
        if predicted > max_call_s:
            return Skipped(f"predicted {predicted:.0f} s > {max_call_s:.0f} s per-call limit", predicted)
    if linear:
        fn = lambda: module(x)
    else:
        opts = {"optimized_attention_override": override(backends[name])}
        fn = lambda: module(x, transformer_options=opts)
    big = predicted is not None and predicted > 1.0
    try:
        return measure(fn, device, max_repeats=3 if quick else 5,
                       budget_s=min(max_call_s, 2.0 if quick else 8.0), warmup=not big)
    except torch.OutOfMemoryError as e:
        return Skipped(f"out of memory ({str(e).splitlines()[0][:80]})")


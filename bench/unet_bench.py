"""Sections 2-4: a full UNet evaluation (one CFG sampling step, batch 2) and a short sampling run.

A "step" is comfy.sample.sample with one Euler step at CFG 7.5: ComfyUI batches cond and uncond into
one batch-2 UNet call, exactly what every step of a user's KSampler costs. Variants of the same MODEL:
  linfusion  attn1 replaced by the extension's nodes (attn2 on PyTorch SDPA)
  sdpa       ComfyUI with PyTorch SDPA everywhere (what --use-pytorch-cross-attention gives)
  default    ComfyUI's default attention on this device (sub-quadratic on CPU), untouched MODEL
  no_attn1   attn1 removed (output zero): the floor any attn1 replacement can reach
"""
from __future__ import annotations

import logging
import math

import numpy as np
import psutil
import torch

from .attention_bench import comfy_backends, override
from .linfusion_adapter import apply_linfusion
from .measure import Skipped, measure
from .unet_models import PARAMS, conditioning

log = logging.getLogger("LinFusion")

WARMUP_PIXELS = 128


class NoAttention(torch.nn.Module):
    """attn1 removed: the block adds zero, so everything else of the UNet still runs."""

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        return torch.zeros_like(x)


def with_attention(patcher, func):
    model = patcher.clone()
    options = model.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = override(func)
    return model


def without_attn1(patcher):
    model = patcher.clone()
    for name, module in patcher.model.diffusion_model.named_modules():
        if name.endswith(".attn1"):
            model.add_object_patch(f"diffusion_model.{name}", NoAttention())
    return model


def variants(patcher, linfusion_name: str | None, device, wanted: list[str]) -> dict:
    sdpa = comfy_backends(device)["sdpa"]
    out = {}
    for name in wanted:
        if name == "linfusion":
            lin = apply_linfusion(patcher, linfusion_name) if linfusion_name else None
            out[name] = with_attention(lin, sdpa) if lin is not None else None
        elif name == "sdpa":
            out[name] = with_attention(patcher, sdpa)
        elif name == "default":
            out[name] = patcher.clone()
        elif name == "no_attn1":
            out[name] = with_attention(without_attn1(patcher), sdpa)
    return out


def sample(model, family: str, pixels: int, steps: int, seed: int = 0):
    import comfy.sample

    positive, negative = conditioning(family, seed)
    latent = torch.zeros(1, 4, pixels // 8, pixels // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def fits_in_memory(family: str) -> tuple[bool, str]:
    need = PARAMS[family] * 4 * 1.3       # fp32 weights and room for activations
    free = psutil.virtual_memory().available
    return need < free, f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available"


def step_sweep(models: dict, family: str, sizes: list[int], device, *, max_step_s: float,
               quick: bool, only: dict | None = None, on_row=None) -> list[dict]:
    """Median time of one UNet step per (variant, size); sizes past the time limit are skipped.

    `only` limits a variant to some sizes (e.g. ComfyUI's sub-quadratic default at the smallest).
    """
    rows = []
    last = {}
    for model in models.values():
        # First-call costs (loading, patching, allocator growth) paid at a tiny size, not timed.
        if model is not None:
            sample(model, family, WARMUP_PIXELS, 1)
    for pixels in sizes:
        for name, model in models.items():
            row = {"family": family, "pixels": pixels, "variant": name, "batch": 2}
            result = _one_step(model, name, family, pixels, last, device, max_step_s, quick, only)
            row.update(result.as_dict())
            if not isinstance(result, Skipped):
                last[name] = (pixels, result.median_s)
                row["reps"] = len(result.times_s)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            log.info("[LinFusion] bench %s step %d px %s: %s", family, pixels, name,
                     row.get("skipped") or f"{row['median_s']:.2f} s")
    return rows


def _one_step(model, name, family, pixels, last, device, max_step_s, quick, only):
    if model is None:
        return Skipped("LinFusion nodes not available")
    if only and name in only and pixels not in only[name]:
        return Skipped("only run at the smallest size, to save time")
    predicted = None
    if name in last:
        prev_px, prev_s = last[name]
        # Pixel-count ratio; softmax variants grow with its square at the big levels.
        ratio = (pixels / prev_px) ** 2
        predicted = prev_s * ratio ** (1 if name in ("linfusion", "no_attn1") else 2)
        if predicted > max_step_s:
            return Skipped(f"predicted {predicted:.0f} s > {max_step_s:.0f} s limit", predicted)
    return measure(lambda: sample(model, family, pixels, 1), device, max_repeats=3,
                   budget_s=10.0 if quick else 40.0, warmup=False)


def fit_exponent(rows: list[dict], variant: str) -> float | None:
    """Slope of log(time) against log(pixel count) over the measured sizes."""
    pts = [(r["pixels"] ** 2, r["median_s"]) for r in rows if r["variant"] == variant and "median_s" in r]
    if len(pts) < 2:
        return None
    x, y = np.log([p for p, _ in pts]), np.log([t for _, t in pts])
    return float(np.polyfit(x, y, 1)[0])


def sampling_run(models: dict, family: str, pixels: int, steps: int, device) -> list[dict]:
    rows = []
    for name, model in models.items():
        row = {"family": family, "pixels": pixels, "steps": steps, "variant": name}
        if model is None:
            row.update(Skipped("LinFusion nodes not available").as_dict())
        else:
            res = measure(lambda: sample(model, family, pixels, steps), device, max_repeats=1, warmup=False)
            row.update(res.as_dict())
        rows.append(row)
        log.info("[LinFusion] bench sampling %s %d px x %d steps %s: %s", family, pixels, steps, name,
                 row.get("skipped") or f"{row['median_s']:.2f} s")
    return rows


def estimate_from_attn1(step_rows, attn_rows, family, pixels, levels, base="linfusion", target="sdpa"):
    """A step time for `target` at a size too slow to run: the measured `base` step with every attn1
    call's time swapped for the target backend's (measured, or extrapolated as N^2 past the limit)."""
    base_row = next((r for r in step_rows if r["variant"] == base and r["pixels"] == pixels
                     and "median_s" in r), None)
    if base_row is None:
        return None
    total = base_row["median_s"]
    for tokens, dim, count in levels:
        t = {}
        for backend in (base, target):
            r = next((r for r in attn_rows if r["dim"] == dim and r["tokens"] == tokens
                      and r["backend"] == backend), None)
            if r is None:
                return None
            t[backend] = r.get("median_s") or r.get("predicted_s")
            if t[backend] is None or math.isnan(t[backend]):
                return None
        total += count * (t[target] - t[base])
    return total

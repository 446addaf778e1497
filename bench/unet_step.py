"""One sampling step (one CFG UNet evaluation, cond + uncond) of MODEL variants at several image sizes.

A step is comfy.sample.sample with one Euler step: exactly what each step of a user's KSampler costs. The
same function measures the plain LinFusion vs SDPA steps, Low-Memory Mode vs normal and Tiled UNet vs
untiled: they differ only in the variants (bench/models.py:variant) and sizes. Every variant at a size
gets the same number of runs (n(px)), and the time spent inside attn1 is recorded beside the step time.
"""
from __future__ import annotations

import logging

from . import models
from .timing import PartClock, measure, predict

log = logging.getLogger("LinFusion")


def run(core, base, weights, family: str, sizes: list[int], variants: list[str], n, budget,
        max_step_s: float, tile: int = 64) -> list[dict]:
    device = models.device()
    built = {v: models.variant(core, base, weights, v, tile) for v in variants}
    for model in built.values():          # loading, patching and allocator growth, paid once and not timed
        models.sample(model, family, 64)
    rows, last, attn1 = [], {}, models.attn1_modules(base)
    for px in sizes:
        for name, model in built.items():
            row = {"family": family, "px": px, "variant": name}
            # Softmax cost grows with the square of the pixel count at the big levels; the rest linearly.
            guess = predict(last.get(name), px * px, 2 if name.startswith("sdpa") else 1)
            skip = budget.refuse(guess, n(px), max_step_s)
            if skip:
                rows.append({**row, **skip})
                log.info("[LinFusion] bench %s step %d px %s: %s", family, px, name, skip["skipped"])
                continue
            with PartClock(device, {"attn1": attn1}) as clock:
                row.update(measure(lambda: models.sample(model, family, px), device, n(px), warmup=False))
            # Tiled UNet runs LinFusion as per-tile state passes (compute_state / attend) that no hook sees.
            row["attn1_s"] = None if "tiled" in name else clock.seconds["attn1"] / row["n"]
            last[name] = (px * px, row["median_s"])
            rows.append(row)
            log.info("[LinFusion] bench %s step %d px %s: %.2f s (n=%d)", family, px, name, row["median_s"], row["n"])
    return rows

"""One sampling step (one CFG UNet evaluation, cond + uncond) of MODEL variants at several image sizes.

A step is comfy.sample.sample with one Euler step: exactly what each step of a user's KSampler costs. The
same function measures the plain LinFusion vs SDPA steps, Low-Memory Mode vs normal and Tiled UNet vs
untiled: they differ only in the variants (bench/models.py:variant) and sizes. The variants at a size run
interleaved after one warm-up step each at that size (timing.interleaved), the same number of times, and
every run records its time inside attn1 and outside it (wall and CPU time).

On a GPU the split needs a device sync at each attn1's start and end (bench/timing.PartClock), which drains the
launch queue 140 times a step and inflates the step (issue #29). There the step time (`median_s`, `times_s`) comes
from n runs without hooks, and the split from n more hooked runs, interleaved the same way (`hooked_times_s` is
their own step time, the scale of the split). On a CPU a sync is a no-op and one set of runs gives both.

A step is a whole sampler run of one step, so it includes what Apply LinFusion does once per run: the fast path
packs each module's weights at ON_PRE_RUN (for SDXL 2730 ops for its 70 modules, docs/outside_attn1.json), which a
20-step run pays once.
"""
from __future__ import annotations

import logging
import statistics

from . import models
from .timing import interleaved, predict

log = logging.getLogger("LinFusion")


def run(core, base, weights, family: str, sizes: list[int], variants: list[str], n, budget,
        max_step_s: float, tile: int = 64) -> list[dict]:
    device = models.device()
    built = {v: models.variant(core, base, weights, v, tile) for v in variants}
    for model in built.values():          # loading, patching and allocator growth, paid once and not timed
        models.sample(model, family, 64)
    rows, last, attn1 = [], {}, models.attn1_modules(base)
    separate = device.type == "cuda"
    for px in sizes:
        todo = {}
        for name, model in built.items():
            row = {"family": family, "px": px, "variant": name}
            # Softmax cost grows with the square of the pixel count at the big levels; the rest linearly.
            guess = predict(last.get(name), px * px, 2 if name.startswith("sdpa") else 1)
            # n timed runs and one warm-up run, for every variant (a skipped one skips the size's comparison).
            skip = budget.refuse(guess, n(px) * (2 if separate else 1) + 1, max_step_s)
            if skip:
                rows.append({**row, **skip})
                log.info("[LinFusion] bench %s step %d px %s: %s", family, px, name, skip["skipped"])
                continue
            todo[name] = row
        if not todo:
            continue
        fns = {name: (lambda m=built[name]: models.sample(m, family, px)) for name in todo}
        timed = interleaved(fns, device, n(px), None if separate else {"attn1": attn1})
        if separate:
            hooked = interleaved(fns, device, n(px), {"attn1": attn1}, warmup=False)
            for name, res in timed.items():
                res.update({k: v for k, v in hooked[name].items() if k.startswith(("attn1_", "outside_"))},
                           hooked_times_s=hooked[name]["times_s"])
        for name, res in timed.items():
            row = dict(todo[name], **res, interleaved=list(todo), warmup_px=px)
            # Tiled UNet runs LinFusion as per-tile state passes (compute_state / attend) that no hook sees.
            if "tiled" in name:
                for k in ("attn1_times_s", "attn1_cpu_s", "outside_times_s", "outside_cpu_s"):
                    row.pop(k, None)
            else:
                row["attn1_s"] = statistics.median(row["attn1_times_s"])
            last[name] = (px * px, row["median_s"])
            rows.append(row)
            log.info("[LinFusion] bench %s step %d px %s: %.2f s (n=%d, interleaved with %s)", family, px, name,
                     row["median_s"], row["n"], ", ".join(v for v in todo if v != name) or "nothing")
    return rows

"""The benchmark's bookkeeping: UNet configs ComfyUI recognises, attn1 call counts, fits and estimates.

These are the numbers docs/benchmarks.md is built from; the timings themselves are never asserted.
"""
import math

from bench.unet_bench import estimate_from_attn1, fit_exponent
from bench.unet_models import FAMILIES, attn1_levels
from bench.linfusion_adapter import linfusion_attn1_flops


def test_bench_unet_configs_are_detected_as_the_real_families(host):
    import comfy.model_detection
    import comfy.supported_models as sm

    import torch
    sd15 = comfy.model_detection.model_config_from_unet_config(dict(FAMILIES["sd15"], dtype=torch.float32))
    sdxl = comfy.model_detection.model_config_from_unet_config(dict(FAMILIES["sdxl"], dtype=torch.float32))
    assert type(sd15) is sm.SD15
    assert type(sdxl) is sm.SDXL


def test_attn1_levels_match_the_released_module_counts():
    # LinFusion-1-5 has 16 modules, LinFusion-XL 70 (LINFUSION_FACTS section 3).
    assert sum(c for _, _, c in attn1_levels("sd15", 512)) == 16
    assert sum(c for _, _, c in attn1_levels("sdxl", 1024)) == 70
    assert attn1_levels("sd15", 1024) == [(16384, 320, 5), (4096, 640, 5), (1024, 1280, 5), (256, 1280, 1)]
    assert attn1_levels("sdxl", 1024) == [(4096, 640, 10), (1024, 1280, 50), (1024, 1280, 10)]


def test_linfusion_flops_follow_the_facts_sheet():
    n, c, h = 16384, 320, 8
    # ~16 N C^2 with m = C, plus the small d x d attention terms.
    flops = linfusion_attn1_flops(1, n, c, h, None)
    assert 16 * n * c * c < flops < 17 * n * c * c
    assert linfusion_attn1_flops(1, n, c, h, -1) < 9 * n * c * c     # no q/k MLPs


def test_exponent_fit_recovers_a_power_law():
    rows = [{"family": "sd15", "variant": "v", "pixels": p, "median_s": 0.1 * (p * p) ** 1.25}
            for p in (512, 1024, 2048)]
    assert math.isclose(fit_exponent(rows, "v"), 1.25, rel_tol=1e-9)
    assert fit_exponent(rows[:1], "v") is None


def test_skipped_sdpa_step_is_estimated_from_attn1_swaps():
    steps = [{"variant": "linfusion", "pixels": 1024, "median_s": 10.0}]
    levels = [(16384, 320, 5), (4096, 640, 1)]
    attn = [{"dim": 320, "tokens": 16384, "backend": "linfusion", "median_s": 0.5},
            {"dim": 320, "tokens": 16384, "backend": "sdpa", "skipped": "slow", "predicted_s": 4.5},
            {"dim": 640, "tokens": 4096, "backend": "linfusion", "median_s": 0.2},
            {"dim": 640, "tokens": 4096, "backend": "sdpa", "median_s": 0.3}]
    assert math.isclose(estimate_from_attn1(steps, attn, "sd15", 1024, levels), 10.0 + 5 * 4.0 + 0.1)
    assert estimate_from_attn1(steps, attn[:1], "sd15", 1024, levels) is None

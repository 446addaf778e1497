"""The benchmark's bookkeeping: model configs ComfyUI recognises, attn1 counts and FLOPs, the workflows it
reads, the timing helpers, and the page's rules (ratios say n, fits share sizes, estimates are labelled).
No timing is asserted; these are the numbers docs/benchmarks.md is computed from.
"""
import math

import torch

from bench import page
from bench.attn1 import linfusion_flops
from bench.breakdown import workflows
from bench.models import FAMILIES, attn1_levels
from bench.timing import Budget, PartClock, interleaved, measure


def test_bench_unet_configs_are_detected_as_the_real_families(host):
    import comfy.model_detection
    import comfy.supported_models as sm

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
    assert attn1_levels("sd15", 1024, quick=True)[0] == (16384, 32, 5)


def test_linfusion_flops_follow_the_facts_sheet():
    n, c, h = 16384, 320, 8
    flops = linfusion_flops(1, n, c, h)          # ~16 N C^2 with m = C, plus the small d x d terms
    assert 16 * n * c * c < flops < 17 * n * c * c
    assert linfusion_flops(1, n, c, h, -1) < 9 * n * c * c     # no q/k MLPs


def test_workflow_steps_are_read_from_the_shipped_graphs():
    found = {w["workflow"]: w for w in workflows()}
    assert found["linfusion_1_sd15_txt2img_2048"].items() >= {"family": "sd15", "width": 2048, "height": 2048, "steps": 50,
                                                    "variant": "linfusion", "controlnet": False}.items()
    ladder = found["linfusion_2_sd15_16k_ladder"]
    assert (ladder["width"], ladder["height"], ladder["variant"]) == (16384, 8192, "linfusion+low-memory+tiled")
    assert found["linfusion_3_sdxl_demofusion_8k"]["family"] == "sdxl" and found["linfusion_3_sdxl_demofusion_8k"]["width"] == 8192
    assert found["linfusion_4_controlnet_2048"]["controlnet"] is True
    assert found["linfusion_4_controlnet_2048"]["controlnet_attention"] == "linfusion"      # measured as shipped
    assert found["linfusion_1_sd15_txt2img_2048"]["controlnet_attention"] is None
    assert "skipped" in found["linfusion_8_demofusion_ksampler"]


def test_measure_runs_exactly_n_times_and_part_clock_sees_only_its_modules():
    inner, outer = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    calls = []
    fn = lambda: calls.append(1) or outer(inner(torch.randn(256, 64)))
    res = measure(fn, torch.device("cpu"), 3)
    assert len(calls) == 4 and res["n"] == 3 and len(res["times_s"]) == 3      # one warm-up, three timed
    assert res["median_s"] == sorted(res["times_s"])[1]
    with PartClock(torch.device("cpu"), {"inner": [inner]}) as clock:
        res = measure(fn, torch.device("cpu"), 3, warmup=False)
    assert len(calls) == 7
    # The inner module's intervals lie inside the timed calls' intervals (a containment, not a speed claim).
    assert 0 < clock.seconds["inner"] <= sum(res["times_s"])


def test_budget_refuses_what_does_not_fit_and_says_why():
    budget = Budget(100)
    assert budget.refuse(None, 3) is None and budget.refuse(10, 3) is None
    assert "budget" in budget.refuse(50, 3)["skipped"]
    assert budget.refuse(10, 1, limit_s=5)["predicted_s"] == 10
    assert Budget(-1).refuse(None, 1)["skipped"] == "time budget spent"


def test_page_ratios_say_n_and_estimates_are_never_measurements():
    five, one = {"median_s": 1.0, "n": 5}, {"median_s": 16.0, "n": 1}
    assert page.speedup(five, one) == "16.0x faster (n=5 vs 1: not significant)"
    assert page.speedup(five, dict(one, n=5)) == "16.0x faster"
    assert page.speedup(five, dict(five, median_s=1.08)) == "1.08x faster"      # 10 % shows at this resolution
    assert page.speedup(five, dict(five, median_s=0.95)) == "1.05x slower"
    assert page.speedup(dict(five, n=2), dict(five, n=2)) == "1.00x faster (not significant)"
    skipped = {"skipped": "budget", "predicted_s": 1034.0}
    assert page.secs(skipped) == "skipped (budget; estimate 1034 s)" and page.speedup(five, skipped) == "-"
    assert "not significant" in page.headline_ratio(five, one)
    assert page.secs({"median_s": 2.0, "n": 3, "times_s": [2.5, 2.0, 1.5]}) == "2.00 s (1.50 s-2.50 s, n=3)"
    # A median inside the other side's spread: the ratio is no win or loss, and the page says so.
    a = {"median_s": 46.4, "n": 3, "times_s": [45.2, 46.4, 56.8]}
    b = {"median_s": 48.4, "n": 3, "times_s": [43.1, 48.4, 53.6]}
    assert page.speedup(a, b) == "1.04x faster (a median inside the other's spread: equal within the noise)"
    assert page.speedup(a, dict(b, times_s=[57.0, 58.0, 59.0], median_s=58.0)) == "1.2x faster"
    # One outlier that reaches the other side is not enough to call a clear difference equal.
    slow = {"median_s": 51.8, "n": 3, "times_s": [46.9, 51.8, 53.0]}
    assert page.speedup(slow, {"median_s": 36.4, "n": 3, "times_s": [35.7, 36.4, 49.1]}) == "1.4x slower"


def test_page_fits_and_crossover():
    assert math.isclose(page.fit_exponent([(p * p, 0.1 * (p * p) ** 1.25) for p in (512, 1024, 2048)]), 1.25)
    assert page.fit_exponent([(1, 1.0)]) is None
    row = lambda n, b, s: {"dim": 320, "dtype": "float32", "tokens": n, "backend": b, "median_s": s}
    rows = [row(1024, "linfusion", 2.0), row(1024, "sdpa", 1.0), row(4096, "linfusion", 4.0), row(4096, "sdpa", 8.0)]
    assert page.crossover(rows, 320, "float32") == "N ~ 2048 (between 1024 and 4096)"   # ratio 2 -> 1/2: 1 halfway


def test_page_renders_from_json_and_fits_over_common_sizes_only():
    step = lambda px, v, s, n=3: {"family": "sd15", "px": px, "variant": v, "median_s": s, "n": n, "peak_bytes": 2**30}
    rows = [step(512, "linfusion", 1.0), step(512, "sdpa", 1.0), step(1024, "linfusion", 4.0),
            step(1024, "sdpa", 8.0), step(2048, "linfusion", 16.0),
            {"family": "sd15", "px": 2048, "variant": "sdpa", "skipped": "budget", "predicted_s": 99.0}]
    meta = {"command": "run_all.py", "plan": "cpu", "started": "now", "elapsed_s": 60, "load_end": 9.0,
            "machine": {"device": "cpu", "cpu_cores": 2, "load_start": 8.0, "commit": "abc123"},
            "gemm_peak_flops": {"float32": 1e11}}
    text = page.render({"cpu": {"meta": meta, "sections": {"unet_step": rows}}}, [])
    assert "sd15 step at 1024 px, both measured" in text and "2.0x faster" in text
    assert "over the same 2 sizes" in text and "sdpa exponent 1.50" in text       # 2048 px not in the fit
    assert "estimate 99 s" in text and "NOT idle" in text and "abc123" in text
    assert "Not measured on a GPU" in text and "re-measured" not in text


def test_a_sectioned_run_replaces_only_what_it_measured():
    from bench.run_all import merge
    sections = {"unet_step": [{"family": "sd15", "px": 512, "run": 0}, {"family": "sdxl", "px": 512, "run": 0}],
                "attn1": [{"tokens": 1024, "run": 0}]}
    merge(sections, "unet_step", [{"family": "sdxl", "px": 1024}], 1)       # a new size: the 512 px row stays
    assert sections["unet_step"] == [{"family": "sd15", "px": 512, "run": 0}, {"family": "sdxl", "px": 512, "run": 0},
                                     {"family": "sdxl", "px": 1024, "run": 1}]
    merge(sections, "unet_step", [{"family": "sdxl", "px": 512}], 4)        # the same size: replaced
    assert sections["unet_step"] == [{"family": "sd15", "px": 512, "run": 0}, {"family": "sdxl", "px": 1024, "run": 1},
                                     {"family": "sdxl", "px": 512, "run": 4}]
    sections["breakdown"] = [{"family": "sd15", "workflow": "1", "run": 0}, {"family": "sdxl", "workflow": "3", "run": 0}]
    merge(sections, "breakdown", [{"family": "sd15", "workflow": "4"}], 5)  # rows without px: the whole family
    assert sections["breakdown"] == [{"family": "sdxl", "workflow": "3", "run": 0}, {"family": "sd15", "workflow": "4", "run": 5}]
    merge(sections, "attn1", [{"tokens": 4096}], 2)
    assert sections["attn1"] == [{"tokens": 4096, "run": 2}]
    sections["peers"] = [{"peer": "p", "skipped": "failed", "run": 2}]       # a skip has no family
    merge(sections, "peers", [{"peer": "p", "family": "sd15", "px": 1024}], 3)
    assert sections["peers"] == [{"peer": "p", "family": "sd15", "px": 1024, "run": 3}]


def test_page_says_which_run_measured_each_section_and_whether_it_was_idle():
    run = lambda started, elapsed, load_start, load_end, **kw: dict(
        command="c", started=started, elapsed_s=elapsed, load_end=load_end,
        machine={"cpu_cores": 2, "load_start": load_start, "commit": "abc"}, sections=["unet_step"], **kw)
    runs = [run("2026-12-02 03:37 UTC", 900, 0.7, 2.0),     # idle start
            run("2026-12-02 03:52 UTC", 60, 1.9, 2.1),      # the tail of run 0 (ended 03:52): idle
            run("2026-12-02 05:00 UTC", 60, 1.9, 2.1),      # nothing ran before it: someone else's load
            run("2026-12-02 05:10 UTC", 60, 1.9, 2.1, other_cores=0.05),    # measured: others used 0.05 cores
            run("2026-12-02 05:20 UTC", 60, 0.1, 0.1, other_cores=0.9)]
    assert [page.idle(r, runs[i - 1] if i else None) for i, r in enumerate(runs)] == [True, True, False, True, False]
    step = lambda px, variant, run: {"family": "sd15", "px": px, "variant": variant, "median_s": 1.0, "n": 3, "run": run}
    rows = [step(512, "linfusion", 1), step(512, "sdpa", 2), step(1024, "linfusion", 4), step(1024, "sdpa", 4)]
    meta = dict(runs[-1], plan="cpu", runs=runs)
    text = page.render({"cpu": {"meta": meta, "sections": {"unet_step": rows}}}, [])
    assert "Measured by run #1, #2, #4." in text and "other processes: 0.90 cores" in text
    assert text.count("| NOT idle") == 2 and "| #0 |" not in text and "| #3 |" not in text   # runs left with no rows


def test_linfusion_xl_attn1_flops_use_its_heads_and_narrow_mlps():
    # LinFusion-XL: 64-channel heads and C/16-wide query/key MLPs (a C-wide count put SDXL above 100 % of GEMM).
    assert page.attn1_flops("sdxl", 4096, 1280) == linfusion_flops(2, 4096, 1280, 20, 80)
    assert page.attn1_flops("sdxl", 4096, 1280) < 0.6 * page.attn1_flops("sd15", 4096, 1280)


def test_interleaved_alternates_variants_after_a_warm_up_each_and_splits_parts():
    inner = torch.nn.Linear(64, 64)
    order = []
    fns = {"a": lambda: order.append("a") or inner(torch.randn(64, 64)), "b": lambda: order.append("b"),
           "c": lambda: order.append("c")}
    res = interleaved(fns, torch.device("cpu"), 3, parts={"inner": [inner]})
    assert order == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]     # warm-ups, then A B C, C B A, ...
    for name, r in res.items():
        assert r["n"] == 3 and len(r["times_s"]) == len(r["cpu_s"]) == len(r["inner_times_s"]) == 3
        for wall, part, outside in zip(r["times_s"], r["inner_times_s"], r["outside_times_s"]):
            assert math.isclose(part + outside, wall) and part >= 0
    assert all(t > 0 for t in res["a"]["inner_times_s"]) and res["b"]["inner_times_s"] == [0.0] * 3


def test_usdu_tile_table_gives_spread_and_labels_small_n():
    from bench.usdu_tile import table
    rows = [{"px": 512, "variant": "sdpa", "n": 3, "times_s": [10.0, 9.0, 11.0], "median_s": 10.0, "s_per_megapixel": 38.1},
            {"px": 512, "variant": "linfusion", "n": 3, "times_s": [4.0, 5.0, 6.0], "median_s": 5.0, "s_per_megapixel": 19.1},
            {"px": 2048, "variant": "sdpa", "n": 1, "times_s": [80.0], "median_s": 80.0, "s_per_megapixel": 19.1},
            {"px": 2048, "variant": "linfusion", "n": 1, "times_s": [20.0], "median_s": 20.0, "s_per_megapixel": 4.8}]
    doc = {"rows": rows, "machine": {"cpu": "x"}, "load_end": 0.1, "other_cores": 0.0, "elapsed_s": 1}
    lines = table(doc).splitlines()
    assert "| 512 px | 10.00 (9.00-11.00) | 5.00 (4.00-6.00) | 2.00x |" in lines[2]
    assert "4.00x (n < 3: not significant)" in lines[3]

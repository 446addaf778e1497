"""The ladder as one job through ComfyUI's own executor, as workflow 2 ships it (LinFusion, Tiled UNet, the
ladder with the exact tiled VAE), on the SD 1.5 fixture checkpoint: one progress bar with a constant total
that tile-level work moves and that reaches its end; a cancel pressed inside a tiled VAE pass or a tiled UNet
call stops the job within that pass and leaves the model as it was."""
import importlib

import pytest
import torch

LADDER = "8"
# 7 base steps: the sd15 ladder's int(7 * 0.4) and int(7 * 0.3) run 2 steps in each stage (ceil would run 3).
BASE_STEPS = 7
# Units of the job (100 bar ticks each): stage 1 decode, encode, 2 steps; stage 2 decode, encode, 2 steps.
VAE_DECODE_1 = (0, 100)
UNET_STEP_2 = (300, 400)     # the second step of stage 1: the tiled UNet knows its tile count from the first


def ladder_units(core) -> int:
    """The job's units by the recipe's rules: the planned stages' steps plus a decode and an encode per stage."""
    hs = importlib.import_module(core.__name__ + ".highres.highres_schedule")
    stages = hs.plan_stages(32, 24, num_stages=2, ladder="sd15", base_steps=BASE_STEPS)
    assert [s.steps for s in stages] == [2, 2], "the unit positions below assume 2 steps in each stage"
    return sum(s.steps for s in stages) + 2 * len(stages)


def ladder_graph(fixtures):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}},
        "5": {"class_type": "ApplyLinFusion", "inputs": {"model": ["1", 0], "linfusion": ["4", 0],
                                                         "blocks": "all", "min_tokens": 0}},
        "6": {"class_type": "LinFusionTiledUNet", "inputs": {"model": ["5", 0], "tile_size": 8,
                                                             "park_device": "cpu", "mode": "exact"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 24, "batch_size": 1}},
        LADDER: {"class_type": "LinFusionProgressiveUpscale", "inputs": {
            "model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "latent": ["7", 0],
            "seed": 1, "stages": 2, "target_width": 0, "target_height": 0, "ladder": "sd15", "strengths": "",
            "base_steps": BASE_STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "upscale_in": "pixels", "demofusion": False, "anchoring": "off", "vae_tile_size": 64,
            "return_stage_images": False}},
        "9": {"class_type": "LinFusionTest_Capture", "inputs": {"value": [LADDER, 0]}},
    }


_captures = iter(range(1_000_000))


def model_and_vae(host, fixtures):
    """The checkpoint loader's MODEL and VAE objects, as the executor caches them between prompts (capture
    nodes under new ids, so they run again while the loader's output is reused)."""
    n = next(_captures)
    prompt = {"1": ladder_graph(fixtures)["1"],
              f"m{n}": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["1", 0]}},
              f"v{n}": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["1", 2]}}}
    captured = host.run(prompt).captured
    return captured[f"m{n}"], captured[f"v{n}"]


def snapshot(model, vae):
    """Weights at rest and everything a patch could leave behind on the ModelPatcher or the modules."""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    return {
        "weights": {k: v.clone() for k, v in model.model.state_dict().items()},
        "vae": {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()},
        "patches": {k: len(v) for k, v in model.patches.items()},
        "object_patches": sorted(model.object_patches),
        "wrappers": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()},
        "options": sorted(model.model_options.get("transformer_options", {})),
        "instance_forwards": [n for n, m in model.model.named_modules() if "forward" in m.__dict__],
    }


def assert_same(before, after):
    for key in ("weights", "vae"):
        assert before[key].keys() == after[key].keys()
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key]), f"{key} changed"
    for key in ("patches", "object_patches", "wrappers", "options", "instance_forwards"):
        assert before[key] == after[key], f"leftover {key}"


@pytest.mark.slow
def test_one_bar_for_the_whole_ladder_with_tiled_unet_and_tiled_vae(host, core, fixtures):
    result = host.run(ladder_graph(fixtures))
    assert result.captured["9"]["samples"].shape == (1, 4, 12, 16)
    ladder = [(v, t) for node, v, t in result.progress if node == LADDER]
    values = [v for v, _ in ladder]
    total = ladder_units(core) * 100
    assert {t for _, t in ladder} == {total}, "more than one bar, or a bar whose total changes"
    assert values == sorted(values) and values[-1] == total
    assert all(node == LADDER for node, _, _ in result.progress), "nested work drew on a bar of its own"
    # Tile-level work moves the bar inside a unit: the tiled VAE's first decode, the tiled UNet's second step.
    assert any(VAE_DECODE_1[0] < v < VAE_DECODE_1[1] for v in values)
    assert any(UNET_STEP_2[0] < v < UNET_STEP_2[1] for v in values)
    # ... and the first step at stage 2's new size, paced by the tile count at stage 1's size scaled by the area.
    assert any(600 < v < 700 for v in values)


@pytest.mark.slow
@pytest.mark.parametrize("where", [VAE_DECODE_1, UNET_STEP_2], ids=["tiled_vae_pass", "tiled_unet_call"])
def test_cancel_inside_nested_work_stops_the_job_and_leaves_the_model_clean(host, fixtures, where):
    import comfy.model_management
    import comfy.utils

    model, vae = model_and_vae(host, fixtures)
    before = snapshot(model, vae)
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        seen.append(value)
        if where[0] < value < where[1]:
            comfy.model_management.interrupt_current_processing(True)   # the user presses cancel here

    harness_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        failed = host.run(ladder_graph(fixtures), expect_error=True)
    finally:
        # Put back the hook this test replaced (the harness's recorder around main.py's): re-wrapping the
        # current one would keep this test's cancel button pressed for every later prompt whose bar passes
        # through `where` (the ladder workflows in test_workflows.py were interrupted by it).
        comfy.utils.set_progress_bar_global_hook(harness_hook)
        comfy.model_management.interrupt_current_processing(False)
    assert "execution_interrupted" in str(failed)
    assert any(where[0] < v < where[1] for v in seen)
    assert max(seen) < where[1], "the job went on past the pass where it was cancelled"
    model_after, vae_after = model_and_vae(host, fixtures)
    assert model_after is model and vae_after is vae
    assert_same(before, snapshot(model, vae))

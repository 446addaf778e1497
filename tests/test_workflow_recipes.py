"""The recipe workflows against the recipe table (linfusion_core.highres.highres_schedule.RECIPES), the one table the
ladder node's defaults and scripts/example_workflows.py read too: sampler and grid, steps and their rounding, CFG,
strengths, anchoring, SDXL size conditioning, DemoFusion and its skip-residual form, and the paper's negative
conditioning (SD 1.5: the empty prompt; SDXL: the positive zeroed, ConditioningZeroOut), for the ladder and the
base sampler it starts from. Read from the shipped files as the frontend would send them (workflow_to_api)."""
from __future__ import annotations

import importlib

import pytest

from workflow_convert import live_object_info, workflow_to_api
from workflow_shrink import load

RECIPE_WORKFLOWS = {"linfusion_2_sd15_16k_ladder.json": "sd15", "linfusion_3_sdxl_demofusion_8k.json": "sdxl",
                    "linfusion_7_super_resolution.json": "sdxl_superres"}


@pytest.fixture(scope="module")
def object_info(host):
    return live_object_info()


@pytest.fixture(scope="module")
def hs(core):
    return importlib.import_module(core.__name__ + ".highres.highres_schedule")


def producer(prompt, link):
    assert isinstance(link, list), f"expected a link, got the value {link!r}"
    return prompt[link[0]]


def check_negative(prompt, inputs, recipe, hs):
    """The sampler's negative is the paper's: the empty prompt (SD 1.5), or its own positive zeroed (SDXL)."""
    negative = producer(prompt, inputs["negative"])
    if recipe.negative == hs.NEGATIVE_EMPTY_PROMPT:
        assert negative["class_type"] == "CLIPTextEncode" and negative["inputs"]["text"] == "", negative
    else:
        assert recipe.negative == hs.NEGATIVE_ZEROS
        assert negative["class_type"] == "ConditioningZeroOut", negative
        assert negative["inputs"]["conditioning"] == inputs["positive"], "zeros of another conditioning"


@pytest.mark.parametrize("name", RECIPE_WORKFLOWS)
def test_recipe_workflow_follows_the_recipe_table(name, object_info, hs, pu):
    recipe = hs.RECIPES[RECIPE_WORKFLOWS[name]]
    prompt = workflow_to_api(load(name), object_info)
    ladders = [n["inputs"] for n in prompt.values() if n["class_type"] == "LinFusionProgressiveUpscale"]
    assert len(ladders) == 1
    ladder = ladders[0]

    assert ladder["ladder"] == recipe.ladder
    assert pu.resolve_sampling(ladder["sampler_name"], ladder["scheduler"], ladder["ladder"]) == \
        (recipe.sampler, recipe.scheduler)
    assert (ladder["base_steps"], ladder["cfg"]) == (recipe.base_steps, recipe.cfg)
    strengths = hs.parse_strengths(ladder["strengths"])
    plan = hs.plan_stages(1024, 1024, num_stages=ladder["stages"], ladder=ladder["ladder"], strengths=strengths,
                          base_steps=ladder["base_steps"])
    assert [s.strength for s in plan] == pytest.approx(recipe.stage_strengths(ladder["stages"]))
    assert [s.steps for s in plan] == [hs.steps_for_strength(recipe.base_steps, s, recipe.steps_rule)
                                       for s in recipe.stage_strengths(ladder["stages"])]
    assert pu.resolve_anchoring(ladder["anchoring"], ladder["ladder"]) == recipe.anchoring
    assert ladder["demofusion"] == recipe.demofusion
    if recipe.demofusion:
        assert ladder["skip_residual"] == pu.SKIP_ON_STATE and ladder["blur_padding"] == "zeros (paper)"
    if recipe.size_conditioning is not None:
        assert ladder["size_conditioning"] == recipe.size_conditioning
    check_negative(prompt, ladder, recipe, hs)

    if "latent" not in ladder:   # super-resolution starts from the image: no base sampler
        assert "image" in ladder
        return
    base = producer(prompt, ladder["latent"])
    if recipe.sampler == hs.DEIS_SAMPLER:   # the notebook's txt2img: DEIS on its leading grid
        assert base["class_type"] == "SamplerCustomAdvanced"
        deis = producer(prompt, base["inputs"]["sampler"])
        sigmas = producer(prompt, base["inputs"]["sigmas"])
        guider = producer(prompt, base["inputs"]["guider"])
        assert deis["class_type"] == "LinFusionDEISSampler" and deis["inputs"]["steps"] == recipe.base_steps
        assert sigmas["class_type"] == "LinFusionLeadingSigmas"
        assert (sigmas["inputs"]["steps"], sigmas["inputs"]["denoise"]) == (recipe.base_steps, 1.0)
        assert guider["class_type"] == "CFGGuider" and guider["inputs"]["cfg"] == recipe.cfg
        base_inputs = guider["inputs"]
    else:
        assert base["class_type"] == "KSampler"
        base_inputs = base["inputs"]
        assert (base_inputs["sampler_name"], base_inputs["scheduler"]) == (recipe.sampler, recipe.scheduler)
        assert (base_inputs["steps"], base_inputs["cfg"], base_inputs["denoise"]) == \
            (recipe.base_steps, recipe.cfg, 1.0)
    assert (base_inputs["positive"], base_inputs["negative"]) == (ladder["positive"], ladder["negative"])
    if recipe.size_conditioning == "final size (paper)":   # the base is conditioned on the final size too
        empty = producer(prompt, base["inputs"]["latent_image"])["inputs"]
        final = (empty["width"] * 2 ** ladder["stages"], empty["height"] * 2 ** ladder["stages"])
        encoder = producer(prompt, ladder["positive"])["inputs"]
        assert (encoder["width"], encoder["height"], encoder["target_width"], encoder["target_height"]) == final * 2


def test_node_defaults_are_the_recipe_table(hs, pu, host):
    """The ladder node's widget defaults resolve to each ladder's recipe."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"].INPUT_TYPES()
    default = {k: v[1].get("default") for section in ("required", "optional") for k, v in spec[section].items()
               if len(v) > 1}
    for ladder, recipe in hs.LADDER_RECIPES.items():
        assert pu.resolve_sampling(default["sampler_name"], default["scheduler"], ladder) == \
            (recipe.sampler, recipe.scheduler)
        assert pu.resolve_anchoring(default["anchoring"], ladder) == recipe.anchoring
        assert (default["base_steps"], default["cfg"]) == (recipe.base_steps, recipe.cfg)
    assert default["size_conditioning"] == hs.RECIPES["sdxl"].size_conditioning

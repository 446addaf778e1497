"""ComfyUI_IPAdapter_plus (the real pack, tests/third_party_packs.py) beside LinFusion, through the executor.

IP-Adapter patches the cross-attention (attn2 replace patches), LinFusion the self-attention: on the graph of
example workflow 5 (shrunk, the PLUS preset's two files made with random weights in the pack's formats),
each acts (the latents differ from either alone), the order of the two nodes does not matter, and an
IP-Adapter weight of 0 gives exactly LinFusion's output without the IP-Adapter node.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL_ROOT
from third_party_packs import ipadapter_patch_calls, ipadapter_with_models
from workflow_convert import live_object_info, workflow_to_api
from workflow_shrink import load, shrink

pytestmark = pytest.mark.slow
WORKFLOW = "linfusion_5_ipadapter.json"


@pytest.fixture(scope="module")
def ipadapter(host, fixtures):
    return ipadapter_with_models(fixtures, MODEL_ROOT)


@pytest.fixture(scope="module")
def input_image(host):
    import folder_paths
    from PIL import Image

    name = "linfusion_ipadapter_test.png"
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8)
    path = folder_paths.get_input_directory()
    Image.fromarray(pixels.numpy()).save(f"{path}/{name}")
    return name


@pytest.fixture(scope="module")
def runner(host, fixtures, ipadapter, input_image):
    base = shrink(workflow_to_api(load(WORKFLOW), live_object_info()), fixtures, input_image)
    ids = {n["class_type"]: i for i, n in base.items()}
    for node_id in [i for i, n in base.items() if n["class_type"] in ("VAEDecode", "SaveImage")]:
        del base[node_id]   # the sampled latents are compared; decoding them adds nothing
    host.reset_cache()      # then ComfyUI's cache re-runs only what each variant changes

    def run(edit=None):
        prompt = json.loads(json.dumps(base))
        if edit:
            edit(prompt, ids)
        prompt["latent"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": [ids["KSampler"], 0]}}
        with ipadapter_patch_calls(ipadapter) as calls:
            out = host.run(prompt).captured["latent"]["samples"]
        return out, calls.calls
    return run


def ipadapter_first(p, ids):
    p[ids["IPAdapterAdvanced"]]["inputs"]["model"] = [ids["CheckpointLoaderSimple"], 0]
    p[ids["ApplyLinFusion"]]["inputs"]["model"] = [ids["IPAdapterAdvanced"], 0]
    p[ids["KSampler"]]["inputs"]["model"] = [ids["ApplyLinFusion"], 0]


def without_linfusion(p, ids):
    p[ids["IPAdapterAdvanced"]]["inputs"]["model"] = [ids["CheckpointLoaderSimple"], 0]


def without_ipadapter(p, ids):
    p[ids["KSampler"]]["inputs"]["model"] = [ids["ApplyLinFusion"], 0]


def test_ipadapter_and_linfusion_both_act_in_either_order(runner):
    as_shipped, calls = runner()
    swapped, _ = runner(ipadapter_first)
    no_ipadapter, none = runner(without_ipadapter)
    no_linfusion, _ = runner(without_linfusion)
    # The pack's patch ran at the reduced UNet's sites it keys (input 1, output 3), for cond and uncond. (It
    # also keys ("middle", 1), which never matches: ComfyUI names the middle block ("middle", 0).)
    assert {c[0] for c in calls} == {("input", 1), ("output", 3)}, {c[0] for c in calls}
    assert {i for c in calls for i in c[1]} == {0, 1}, "the patch saw both cond and uncond"
    assert none == [], "the IP-Adapter patch ran without its node"
    torch.testing.assert_close(swapped, as_shipped, rtol=0, atol=1e-5)
    print(f"[ipadapter] max |both - LinFusion only| {(as_shipped - no_ipadapter).abs().max().item():.4g}, "
          f"|both - IP-Adapter only| {(as_shipped - no_linfusion).abs().max().item():.4g}, "
          f"|swapped order - as shipped| {(swapped - as_shipped).abs().max().item():.3g}")
    assert (as_shipped - no_ipadapter).abs().max() > 1e-2, "the IP-Adapter had no effect"
    assert (as_shipped - no_linfusion).abs().max() > 1e-2, "LinFusion had no effect"


def test_ipadapter_weight_zero_is_exactly_linfusion_alone(runner):
    def weight_zero(p, ids):
        p[ids["IPAdapterAdvanced"]]["inputs"]["weight"] = 0.0

    zero, calls = runner(weight_zero)
    alone, _ = runner(without_ipadapter)
    assert calls, "the pack's patch did not run at weight 0 (the comparison would be empty)"
    assert torch.equal(zero, alone), f"max diff {(zero - alone).abs().max().item():.3g}"

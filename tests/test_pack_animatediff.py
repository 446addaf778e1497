"""ComfyUI-AnimateDiff-Evolved (the real pack, tests/third_party_packs.py) with LinFusion, through the executor.

AnimateDiff places its motion modules by SD 1.5's block layout, so this uses the full SD 1.5 UNet layout (random
weights, tests/pack_models.py) and a motion module in the AnimateDiff v3 file layout the pack loads, on a
16-frame batch of 64 px frames (8 x 8 latents), one Euler step at CFG 1 (one UNet call per frame).

Shown, with and without the pack's context windows (8 frames, overlap 4): LinFusion replaces the spatial
self-attention of every frame (its calls see one frame's 64 tokens, 16 frames in the batch) while the motion
module's temporal attention stays the pack's (its VersatileAttention sees the frames of the window as its
sequence); both act; with the motion module's effect at 0 (the pack's "motion off": the module hands its input
back) the frames equal LinFusion's per-image output. The pack's scale at 0 is not "motion off": it multiplies
the temporal attention's keys, so each frame attends uniformly to the window's frames and the module (with its
feed-forward) still mixes frames; the test shows that too.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import MODEL_ROOT
from pack_graphs import LinFusionTokens, add_linfusion
from pack_models import PackModels
from third_party_packs import ANIMATEDIFF, PackCalls, add_model_folder, require_pack

pytestmark = pytest.mark.slow
FRAMES = 16


@pytest.fixture(scope="module")
def ad(host, fixtures):
    pack = require_pack(ANIMATEDIFF)
    models = PackModels(MODEL_ROOT, fixtures)
    unet, linfusion = models.full_sd15()
    motion = models.motion_module(pack.module)
    add_model_folder("animatediff_models", models.folder("animatediff_models"))
    host.reset_cache()
    return pack, unet, linfusion, motion


def prompt(fixtures, ad, *, linfusion=True, motion_scale=None, effect=None, context=False):
    """UNet (full SD 1.5 layout) -> [Apply LinFusion] -> [AnimateDiff: motion module at motion_scale] ->
    KSampler over 16 frames; "out" captures the latents. effect: the pack's effect_multival (None: not set)."""
    _, unet, lin, motion = ad
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "waves on a beach", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": 11, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "out": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ks", 0]}},
    }
    if linfusion:
        add_linfusion(p, lin, model=("unet", 0))
        p["ks"]["inputs"]["model"] = ["apply", 0]
    if motion_scale is not None:
        p["mm"] = {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": motion}}
        p["scale"] = {"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": motion_scale}}
        p["apply_mm"] = {"class_type": "ADE_ApplyAnimateDiffModel", "inputs": {
            "motion_model": ["mm", 0], "start_percent": 0.0, "end_percent": 1.0, "scale_multival": ["scale", 0]}}
        if effect is not None:
            p["effect"] = {"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": effect}}
            p["apply_mm"]["inputs"]["effect_multival"] = ["effect", 0]
        p["evolved"] = {"class_type": "ADE_UseEvolvedSampling", "inputs": {
            "model": p["ks"]["inputs"]["model"], "beta_schedule": "use existing", "m_models": ["apply_mm", 0]}}
        if context:
            p["ctx"] = {"class_type": "ADE_StandardStaticContextOptions", "inputs": {
                "context_length": 8, "context_overlap": 4}}
            p["evolved"]["inputs"]["context_options"] = ["ctx", 0]
        p["ks"]["inputs"]["model"] = ["evolved", 0]
    return p


def run(host, core, ad, p):
    pack = ad[0]
    mad = sys.modules[pack.module.__name__ + ".animatediff.motion_module_ad"]
    temporal = PackCalls(mad.VersatileAttention, "forward",
                         lambda hidden_states, *a, video_length=None, **k: (tuple(hidden_states.shape), video_length))
    with temporal, LinFusionTokens(core) as spatial:
        out = host.run(p).captured["out"]["samples"]
    assert out.shape == (FRAMES, 4, 8, 8) and torch.isfinite(out).all()
    return out, spatial, temporal.calls


@pytest.fixture(scope="module")
def linfusion_per_image(host, core, fixtures, ad):
    out, spatial, temporal = run(host, core, ad, prompt(fixtures, ad))
    assert not temporal
    return out, spatial


@pytest.mark.parametrize("context", [False, True], ids=["whole batch", "context windows 8/4"])
def test_linfusion_spatial_per_frame_motion_module_temporal(host, core, fixtures, ad, linfusion_per_image, context):
    alone, _ = linfusion_per_image
    both, spatial, temporal = run(host, core, ad, prompt(fixtures, ad, motion_scale=1.0, context=context))
    window = 8 if context else FRAMES
    # LinFusion: one frame's tokens per call (8 x 8 at the top level), frames in the batch.
    assert spatial.shapes and max(spatial.tokens) == 64, sorted(spatial.tokens)
    assert {s[0] for s in spatial.shapes} == {window}, {s[0] for s in spatial.shapes}
    # The motion module: the pack's own temporal attention, over the window's frames.
    assert temporal, "the motion module's temporal attention never ran"
    assert {c[1] for c in temporal} == {window}
    assert {c[0][0] for c in temporal} >= {window}
    motion_only, spatial_none, _ = run(host, core, ad, prompt(fixtures, ad, linfusion=False, motion_scale=1.0,
                                                               context=context))
    assert not spatial_none.shapes
    assert (both - alone).abs().max() > 1e-2, "the motion module had no effect"
    assert (both - motion_only).abs().max() > 1e-2, "LinFusion had no effect beside the motion module"
    frames = both.flatten(1)
    assert (frames[1:] - frames[:1]).abs().max() > 1e-3


@pytest.mark.parametrize("context", [False, True], ids=["whole batch", "context windows 8/4"])
def test_motion_module_at_zero_effect_gives_linfusion_per_image(host, core, fixtures, ad, linfusion_per_image,
                                                                context):
    alone, _ = linfusion_per_image
    # Effect 0: the pack's motion module returns its input untouched (no temporal attention runs), through the
    # pack's sampling (and its context windows): what is left is LinFusion on each frame.
    off, spatial, temporal = run(host, core, ad, prompt(fixtures, ad, motion_scale=1.0, effect=0.0, context=context))
    assert spatial.shapes and max(spatial.tokens) == 64
    assert not temporal, "the motion module ran at effect 0"
    diff = (off - alone).abs().max().item()
    assert diff < 1e-4, f"max diff {diff:.3g}"
    # Scale 0 is not that: the pack multiplies the temporal attention's keys by it (uniform attention over the
    # window's frames), so the module still runs and mixes frames; LinFusion still does each frame's spatial part.
    zero, spatial, temporal = run(host, core, ad, prompt(fixtures, ad, motion_scale=0.0, context=context))
    assert spatial.shapes and max(spatial.tokens) == 64
    assert temporal, "the motion module's temporal attention never ran at scale 0"
    assert (zero - alone).abs().max() > 1e-2, "the motion module had no effect at scale 0"

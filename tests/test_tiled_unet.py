"""The tiled UNet equals the untiled UNet (fp32, <= 1e-4 relative) and leaves the model untouched.

The models (small SD1.5-family and SDXL-family UNets with LinFusion attn1, random weights) and the
comparison helpers are in tiled_unet_models.py.
"""
from __future__ import annotations

import pytest
import torch

from tiled_unet_models import (CONFIGS, SD15_SMALL, TOL, inputs, model_patcher, one_step, rel_err,
                               random_controlnet, sample, small_unets, state_snapshot)


@pytest.fixture(scope="module")
def unets(host, core):
    return small_unets(core)


@pytest.mark.parametrize("family,h,w,tile", [
    ("sd15", 32, 48, 16),   # tiles divide the latent at every level
    ("sd15", 36, 28, 10),   # they do not, and the deepest levels have odd sizes (upsampling to output_shape)
    ("sdxl", 32, 48, 16),
    ("sdxl", 36, 28, 12),
    ("sd15_cast", 36, 28, 10),
])
def test_tiled_forward_equals_untiled(core, unets, family, h, w, tile):
    unet, config = unets[family], CONFIGS[family]
    x, t, ctx, y = inputs(config, 2, h, w)
    with torch.no_grad():
        ref = unet(x, t, ctx, y, transformer_options={})
        runner = core.tiling.tiled_unet.TiledUNetRunner(unet, tile, "cpu", "cpu", progress=False)
        out = runner.forward(x, t, ctx, y, transformer_options={})
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL
    # More than one tile really ran at the top level (the test would be vacuous otherwise), and only the
    # softmax self-attention left on purpose (SD1.5 middle block) ran untiled.
    assert len(runner._tiles(h, w, unet.model_channels)) > 1
    expected = [(("middle", 0), "BasicTransformerBlock: softmax self-attention")] if family != "sdxl" else []
    assert runner.untiled_layers == expected


def test_tiling_is_not_a_no_op(core, unets):
    """A plain per-tile forward (no exact statistics) must NOT match: the test above can fail."""
    unet = unets["sd15"]
    x, t, ctx, _ = inputs(SD15_SMALL, 1, 32, 32)
    with torch.no_grad():
        ref = unet(x, t, ctx, transformer_options={})
        naive = unet(x[:, :, :, :16], t, ctx, transformer_options={})
    assert rel_err(naive, ref[:, :, :, :16]) > 1e-2


def test_cast_group_norm_weights_are_offloadable_and_uncast(core, unets, monkeypatch):
    """GroupNorm weights that ComfyUI casts per call (manual cast, low VRAM) are cast offloadable and uncast after
    their last use, as ComfyUI's own layers do: the legacy cast leaves them pinned under DynamicVRAM."""
    import comfy.ops
    casts, uncasts = [], []
    cast, uncast = comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight

    def spy_cast(s, *args, **kwargs):
        if isinstance(s, torch.nn.GroupNorm):
            casts.append(kwargs.get("offloadable", False))
        return cast(s, *args, **kwargs)

    def spy_uncast(s, *args, **kwargs):
        if isinstance(s, torch.nn.GroupNorm):
            uncasts.append(s)
        return uncast(s, *args, **kwargs)
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", spy_cast)
    monkeypatch.setattr(comfy.ops, "uncast_bias_weight", spy_uncast)
    x, t, ctx, _ = inputs(SD15_SMALL, 1, 36, 28)
    with torch.no_grad():
        core.tiling.tiled_unet.TiledUNetRunner(unets["sd15_cast"], 10, "cpu", "cpu", progress=False).forward(
            x, t, ctx, transformer_options={})
    assert casts, "no GroupNorm weights were cast: the test could not fail"
    assert all(casts), f"{casts.count(False)} of {len(casts)} GroupNorm casts were the legacy kind"
    assert len(uncasts) == len(casts)


@pytest.mark.parametrize("family,h,w,tile,with_control,min_tokens", [
    ("sd15", 32, 24, 16, False, 0),
    ("sd15", 28, 36, 12, True, 100),   # hybrid: softmax below 100 tokens (deepest level, middle) runs untiled
    ("sdxl", 32, 32, 20, False, 0),
])
def test_sampler_step_equals_untiled(core, host, family, h, w, tile, with_control, min_tokens):
    nodes = host.extension_module.NODE_CLASS_MAPPINGS
    base = model_patcher(core, family, 11, min_tokens)
    control = random_controlnet(CONFIGS[family], 12) if with_control else None
    ref = one_step(base, family, h, w, control)
    if with_control:  # the ControlNet really contributes, so its per-tile residuals are checked too
        assert rel_err(one_step(base, family, h, w), ref) > 1e-2
    before = state_snapshot(base)
    (tiled,) = nodes["LinFusionTiledUNet"]().patch(base, tile, "cpu", "exact")
    host.progress = []
    out = one_step(tiled, family, h, w, control)
    assert rel_err(out, ref) <= TOL
    assert not torch.equal(out, torch.zeros_like(out))
    # The patch lives on the clone only: the model is bit-identical and samples bit-identically.
    after = state_snapshot(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Re-sampling the base model gives its result again. Not asserted bitwise: ComfyUI's CPU cross-attention
    # picks its chunking from the free memory at call time, which may differ between two runs.
    assert rel_err(one_step(base, family, h, w, control), ref) <= 1e-6


def test_wrapper_chains_with_other_wrappers(core, host):
    """Wrappers set before and after ours still run; ours only replaces the innermost forward."""
    from comfy.patcher_extension import WrappersMP
    base = model_patcher(core, "sd15", 21)
    calls = []

    def outer(executor, *args, **kwargs):
        calls.append("outer")
        return executor(*args, **kwargs)

    def inner(executor, *args, **kwargs):
        calls.append("inner")
        return executor(*args, **kwargs)

    m = base.clone()
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_outer", outer)
    m = core.tiling.tiled_unet_patch.apply_tiled_unet(m, 16)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_inner", inner)
    ref = one_step(base, "sd15", 32, 32)
    out = one_step(m, "sd15", 32, 32)
    assert calls and set(calls) == {"outer", "inner"}
    assert rel_err(out, ref) <= TOL
    assert not base.wrappers.get(WrappersMP.DIFFUSION_MODEL)


def test_progress_and_interruption_leave_model_clean(core, host, every_progress_update):
    import comfy.model_management
    base = model_patcher(core, "sd15", 31)
    before = state_snapshot(base)
    tiled = core.tiling.tiled_unet_patch.apply_tiled_unet(base, 8)
    host.progress = []
    one_step(tiled, "sd15", 32, 32)
    assert len(host.progress) > 16, "no per-tile progress was reported"
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            one_step(tiled, "sd15", 32, 32)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    after = state_snapshot(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fast_mode_reuses_previous_state(core, unets):
    unet = unets["sd15"]
    x, t, ctx, _ = inputs(SD15_SMALL, 1, 32, 32)
    cache = {}
    to = lambda s: {"sigmas": torch.tensor([s])}  # noqa: E731
    with torch.no_grad():
        ref = unet(x, t, ctx, transformer_options={})
        first = core.tiling.tiled_unet.TiledUNetRunner(unet, 16, "cpu", "cpu", cache, progress=False)
        out1 = first.forward(x, t, ctx, transformer_options=to(5.0))
        # Same input, same sigma: the stale state is the exact one, and its pass is skipped.
        second = core.tiling.tiled_unet.TiledUNetRunner(unet, 16, "cpu", "cpu", cache, progress=False)
        out2 = second.forward(x, t, ctx, transformer_options=to(5.0))
        # A different input: the state of the previous call is used, so the result is no longer exact.
        x3 = x.flip(-1)
        ref3 = unet(x3, t, ctx, transformer_options={})
        out3 = core.tiling.tiled_unet.TiledUNetRunner(unet, 16, "cpu", "cpu", cache, progress=False).forward(
            x3, t, ctx, transformer_options=to(4.0))
    assert rel_err(out1, ref) <= TOL and rel_err(out2, ref) <= TOL
    assert rel_err(out3, ref3) > TOL


def test_fast_mode_through_the_node_and_a_sampler(core, host):
    """The node's fast mode in ComfyUI's sampler: the first step of every run is exact, later steps use the
    previous step's attention state (close to, but no longer equal to, the untiled result)."""
    from comfy.patcher_extension import WrappersMP
    nodes = host.extension_module.NODE_CLASS_MAPPINGS
    base = model_patcher(core, "sd15", 41)
    (fast,) = nodes["LinFusionTiledUNet"]().patch(base, 16, "cpu", "fast (one-step-stale attention state)")
    wrapper = fast.wrappers[WrappersMP.DIFFUSION_MODEL][core.tiling.tiled_unet_patch.WRAPPER_KEY][0]
    assert wrapper.stale_states == {}
    assert rel_err(one_step(fast, "sd15", 32, 24), one_step(base, "sd15", 32, 24)) <= TOL
    assert wrapper.stale_states, "fast mode kept no state for the next step"
    # A new run with another seed starts exact again (not with the last run's state), then goes stale.
    ref, out = sample(base, "sd15", 32, 24, 3, seed=5), sample(fast, "sd15", 32, 24, 3, seed=5)
    (exact,) = nodes["LinFusionTiledUNet"]().patch(base, 16, "cpu", "exact")
    assert rel_err(sample(exact, "sd15", 32, 24, 3, seed=5), ref) <= TOL
    err = rel_err(out, ref)
    print(f"fast mode, 3 euler steps: relative error {err:.2e}")
    assert TOL < err < 0.5
    assert rel_err(sample(fast, "sd15", 32, 24, 1, seed=6), sample(base, "sd15", 32, 24, 1, seed=6)) <= TOL


def test_bad_settings_are_refused(core):
    with pytest.raises(ValueError, match="park device"):
        core.tiling.tiled_unet_patch.TiledUNetWrapper(16, "gpu0")
    with pytest.raises(ValueError, match="tile size"):
        core.tiling.tiled_unet_patch.TiledUNetWrapper(1)


@pytest.mark.slow
def test_prompt_with_lora_and_controlnet_through_comfy_executor(host, fixtures):
    """The user's graph: checkpoint + LoRA + LinFusion + ControlNet, KSampler with and without the node."""
    def prompt(tiled):
        p = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                         "strength_clip": 1.0, "lora_name": fixtures.lora_sd15}},
            "3": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}},
            "4": {"class_type": "ApplyLinFusion", "inputs": {"model": ["2", 0], "linfusion": ["3", 0],
                                                             "blocks": "all", "min_tokens": 0}},
            "5": {"class_type": "LinFusionTiledUNet", "inputs": {"model": ["4", 0], "tile_size": 16,
                                                                 "park_device": "cpu", "mode": "exact"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["2", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
            "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fixtures.controlnet_sd15}},
            "9": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 192, "batch_size": 1,
                                                         "color": 0x3366CC}},
            "10": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["6", 0], "negative": ["7", 0], "control_net": ["8", 0], "image": ["9", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
            "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
            "12": {"class_type": "KSampler", "inputs": {
                "model": ["5" if tiled else "4", 0], "positive": ["10", 0], "negative": ["10", 1],
                "latent_image": ["11", 0], "seed": 0, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "denoise": 1.0}},
            "13": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["12", 0]}},
        }
        if not tiled:
            del p["5"]
        return p

    ref = host.run(prompt(False)).captured["13"]["samples"]
    result = host.run(prompt(True))
    out = result.captured["13"]["samples"]
    assert out.shape == ref.shape == (1, 4, 24, 32)
    assert rel_err(out, ref) <= TOL
    # Per-tile progress reached ComfyUI's progress hook for the sampler node.
    assert sum(1 for node, _, _ in result.progress if node == "12") > 16

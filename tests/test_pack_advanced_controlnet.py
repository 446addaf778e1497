"""ComfyUI-Advanced-ControlNet (the real pack, tests/third_party_packs.py) through *LinFusion ControlNet*.

The pack replaces ComfyUI's ControlNet classes with its own (ControlNetAdvanced: timestep keyframes, masks,
its own strength scheduling); LinFusion ControlNet subclasses whatever class it is given. On the SD 1.5 fixture
ControlNet loaded by the pack's loader, with LinFusion in the UNet too, through the executor:
- the ControlNet's self-attention runs LinFusion (our install runs around the pack's class, every attn1 of the
  ControlNet gets a LinFusion module) and it changes the result;
- the pack's scheduling still acts on the LinFusion ControlNet: strength, start/end, a timestep keyframe at
  strength 0 and an all-zero mask each give what they give without LinFusion in the ControlNet (off = the
  no-ControlNet output, exactly);
- the loaded ControlNet stays the pack's own, without LinFusion;
- a pack class that is no ControlNet (its Reference ControlNet) is refused with an error naming it.

Its nodes are V3 nodes that do not register on ComfyUI 0.3.75 (third_party_packs.KNOWN_NOT_LOADING): there
test_pack_loads_or_fails_as_known checks the failure is that one, and the rest is not collected.
"""
from __future__ import annotations

import pytest
import torch

from pack_graphs import LinFusionTokens, blocky_input_image, sd15_prompt
from third_party_packs import (ADVANCED_CONTROLNET, KNOWN_NOT_LOADING, PackCalls, PackNotLoaded,
                               host_version_from_env, load_pack, loads_here, require_pack)

pytestmark = pytest.mark.slow
LOADS = loads_here(ADVANCED_CONTROLNET)


def test_pack_loads_or_fails_as_known(host):
    known = KNOWN_NOT_LOADING.get((ADVANCED_CONTROLNET, host_version_from_env()))
    if known is None:
        require_pack(ADVANCED_CONTROLNET)
        return
    with pytest.raises(PackNotLoaded) as e:
        load_pack(ADVANCED_CONTROLNET)
    assert known[0] in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def pack(host):
    return require_pack(ADVANCED_CONTROLNET)


@pytest.fixture(scope="module")
def hint(host):
    return blocky_input_image("linfusion_acn_hint.png", seed=9)


def acn_prompt(fixtures, hint, *, linfusion_cn=True, strength=1.0, start=0.0, end=1.0, keyframe_strength=None,
               mask=None, controlnet=True):
    p = sd15_prompt(fixtures, steps=2)
    if not controlnet:
        return p
    p["hint"] = {"class_type": "LoadImage", "inputs": {"image": hint}}
    p["cn"] = {"class_type": "ACN_ControlNetLoaderAdvanced", "inputs": {"cnet": fixtures.controlnet_sd15}}
    if keyframe_strength is not None:
        p["kf"] = {"class_type": "TimestepKeyframe", "inputs": {"start_percent": 0.0, "strength": keyframe_strength}}
        p["cn"]["inputs"]["_tk_opt"] = ["kf", 0]
    cn = ["cn", 0]
    if linfusion_cn:
        p["lfcn"] = {"class_type": "LinFusionControlNet", "inputs": {
            "control_net": cn, "linfusion": ["lf", 0], "source": "base modules", "distill_steps": 200}}
        cn = ["lfcn", 0]
    p["apply_cn"] = {"class_type": "ACN_AdvancedControlNetApply_v2", "inputs": {
        "positive": ["pos", 0], "negative": ["neg", 0], "control_net": cn, "image": ["hint", 0],
        "strength": strength, "start_percent": start, "end_percent": end}}
    if mask is not None:
        p["mask"] = {"class_type": "SolidMask", "inputs": {"value": mask, "width": 64, "height": 64}}
        p["apply_cn"]["inputs"]["mask_optional"] = ["mask", 0]
    p["ks"]["inputs"]["positive"] = ["apply_cn", 0]
    p["ks"]["inputs"]["negative"] = ["apply_cn", 1]
    p["loaded"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["cn", 0]}}
    return p


def run(host, core, prompt, calls=None):
    """(latent, [(class, LinFusion modules placed) per ControlNet call of ours], the loaded ControlNet)."""
    installs = PackCalls(core.controlnet.controlnet_patch.ControlLinFusion, "installed",
                         lambda control, device: (type(control), len(control.linfusion.placements)))
    host.reset_cache()      # every node runs (a cached capture node would capture nothing)
    with installs, LinFusionTokens(core) as seen:
        result = host.run(prompt)
    if calls is not None:
        calls.append(len(seen.shapes))
    return result.captured["out"]["samples"], installs.calls, result.captured.get("loaded")


def test_linfusion_runs_in_the_packs_controlnet_and_leaves_it_untouched(host, core, fixtures, pack, hint):
    import comfy.cldm.cldm

    counts = []
    plain, plain_installs, _ = run(host, core, acn_prompt(fixtures, hint, linfusion_cn=False), counts)
    lf, installs, loaded = run(host, core, acn_prompt(fixtures, hint), counts)
    none, _, _ = run(host, core, acn_prompt(fixtures, hint, controlnet=False))
    assert not plain_installs
    acn_cls = type(loaded)
    assert "adv_control" in acn_cls.__module__, f"the loader gave a {acn_cls}, not the pack's class"
    assert installs and all(issubclass(c, acn_cls) and issubclass(c, core.controlnet.controlnet_patch.LinFusionControlMixin)
                            for c, _ in installs), installs
    # Every attn1 of the ControlNet got a LinFusion module, and LinFusion ran there on each ControlNet call.
    sites = core.controlnet.controlnet_patch.control_sites(loaded.control_model)
    assert isinstance(loaded.control_model, comfy.cldm.cldm.ControlNet)
    assert {n for _, n in installs} == {len(sites)} == {3}
    assert counts[1] - counts[0] == len(sites) * len(installs), counts
    # The loaded ControlNet: still the pack's class, no LinFusion, no forward left on its attention.
    assert not core.controlnet.controlnet_patch.is_linfusion_control(loaded) and not hasattr(loaded, "linfusion")
    assert not any("forward" in m.__dict__ for n, m in loaded.control_model.named_modules() if n.endswith("attn1"))
    print(f"[advanced-controlnet] max |LinFusion CN - plain CN| {(lf - plain).abs().max().item():.4g}, "
          f"|plain CN - no CN| {(plain - none).abs().max().item():.4g}")
    assert (plain - none).abs().max() > 1e-2, "the ControlNet had no effect"
    assert (lf - plain).abs().max() > 1e-3, "LinFusion in the ControlNet changed nothing"


def test_the_packs_scheduling_still_acts(host, core, fixtures, pack, hint):
    none, _, _ = run(host, core, acn_prompt(fixtures, hint, controlnet=False))
    full, _, _ = run(host, core, acn_prompt(fixtures, hint))
    half, installs, _ = run(host, core, acn_prompt(fixtures, hint, strength=0.5))
    late, _, _ = run(host, core, acn_prompt(fixtures, hint, start=0.5))
    keyframe_off, _, _ = run(host, core, acn_prompt(fixtures, hint, keyframe_strength=0.0))
    masked_off, _, _ = run(host, core, acn_prompt(fixtures, hint, mask=0.0))
    assert installs
    for name, out in (("strength 0.5", half), ("start 50 %", late)):
        assert (out - full).abs().max() > 1e-3, f"{name} changed nothing"
        assert (out - none).abs().max() > 1e-3, f"{name} switched the ControlNet off"
    for name, out in (("a timestep keyframe at strength 0", keyframe_off), ("an all-zero mask", masked_off)):
        diff = (out - none).abs().max().item()
        print(f"[advanced-controlnet] {name}: max |out - no ControlNet| {diff:.3g}")
        assert diff < 1e-5, f"{name} did not switch the LinFusion ControlNet off: max diff {diff:.3g}"


def test_a_pack_class_that_is_no_controlnet_is_refused_by_name(host, fixtures, pack):
    p = sd15_prompt(fixtures)
    p["ref"] = {"class_type": "ACN_ReferenceControlNet", "inputs": {
        "reference_type": "reference_attn", "style_fidelity": 0.5, "ref_weight": 1.0}}
    p["lfcn"] = {"class_type": "LinFusionControlNet", "inputs": {
        "control_net": ["ref", 0], "linfusion": ["lf", 0], "source": "base modules", "distill_steps": 200}}
    p["out"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["lfcn", 0]}}
    err = host.run(p, expect_error=True)
    assert "ReferenceAdvanced" in str(err) and "LinFusion ControlNet takes" in str(err), str(err)


if not LOADS:
    # Not collected where the pack is known not to load: test_pack_loads_or_fails_as_known covers that host.
    del test_linfusion_runs_in_the_packs_controlnet_and_leaves_it_untouched, test_the_packs_scheduling_still_acts
    del test_a_pack_class_that_is_no_controlnet_is_refused_by_name

"""Patch hygiene on the real ComfyUI patcher: LinFusion goes in and out of clones cleanly.

Small real UNets (ComfyUI's own classes, random weights); sampling through comfy.sample, so ComfyUI's own
load/unload/clone-switch path decides when LinFusion is injected and ejected.
"""
import copy
import gc
import weakref

import pytest
import torch

from linfusion_models import build_patcher, linfusion_for, run_unet, sample, unet_inputs
from test_module import reference_module_forward


def lora_like_patches(patcher, scale=0.3, seed=5):
    """Weight-diff patches (what a LoRA becomes inside ComfyUI) on attn1, attn2 and FF weights."""
    g = torch.Generator().manual_seed(seed)
    sd = patcher.model.state_dict()
    keys = [k for k in sd if k.endswith(("attn1.to_q.weight", "attn1.to_out.0.weight", "attn2.to_k.weight",
                                         "ff.net.2.weight"))]
    return {k: (scale * torch.randn(sd[k].shape, generator=g) / sd[k].shape[-1] ** 0.5,) for k in keys}


def attn1_instance_forwards(patcher):
    return [name for name, m in patcher.model.diffusion_model.named_modules()
            if name.endswith("attn1") and "forward" in m.__dict__]


@pytest.fixture(scope="module")
def sd15(core):
    patcher = build_patcher("sd15")
    return patcher, linfusion_for(core, patcher.model)


def test_patched_unet_equals_reference_modules_mounted_by_hand(core, sd15):
    """The injected UNet equals a copy of the UNet whose attn1 modules were swapped by hand for the
    plain reference formula (checks the install path; the diffusers test checks the name mapping)."""
    base, weights = sd15
    patched, info = core.patch.apply_linfusion(base, weights)
    inputs = unet_inputs(base.model, hw=(8, 8))
    out = run_unet(patched, inputs)

    class Reference(torch.nn.Module):
        def __init__(self, sd, heads):
            super().__init__()
            self.sd, self.heads = sd, heads

        def forward(self, x, context=None, value=None, **kwargs):
            return reference_module_forward(self.sd, x, x, x, self.heads)

    by_hand = copy.deepcopy(base.model.diffusion_model)
    for spec in weights.modules:
        path = core.block_map.attn1_name_map(base.model.model_config.unet_config)[spec.name]
        parent, leaf = path.rsplit(".", 1)
        setattr(by_hand.get_submodule(parent), leaf, Reference(weights.module_state_dict(spec.index), spec.heads))
    with torch.no_grad():
        ref = by_hand(inputs["x"], inputs["t"], context=inputs["context"])
    assert "7 of 7" in info
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_unpatched_outputs_are_bit_identical(core, sd15):
    base, weights = sd15
    inputs = unet_inputs(base.model)
    before = run_unet(base, inputs)
    state_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    patched, _ = core.patch.apply_linfusion(base, weights)
    with_lf = run_unet(patched, inputs)
    assert attn1_instance_forwards(base)          # injected while the LinFusion clone is the loaded one
    after = run_unet(base, inputs)
    assert (with_lf - before).abs().max().item() > 1e-3
    assert torch.equal(before, after)
    assert attn1_instance_forwards(base) == []
    # The module tree and its weights were never touched: saving/merging read the original model.
    state_after = patched.model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)


def test_two_clones_sampled_alternately_are_stable(core, sd15):
    base, weights = sd15
    plain = base.clone()
    lf, _ = core.patch.apply_linfusion(base, weights)
    results = {"plain": [], "lf": []}
    for name in ["plain", "lf", "plain", "lf", "lf", "plain"]:
        results[name].append(sample(plain if name == "plain" else lf, seed=3))
    for runs in results.values():
        assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert (results["plain"][0] - results["lf"][0]).abs().max().item() > 1e-3


def test_toggling_linfusion_and_lora_on_one_checkpoint_equals_fresh_runs(core):
    """The trap of object patches: switching between LinFusion/plain clones of one checkpoint, with and
    without a LoRA, in any order, must give what a freshly loaded model gives."""
    def variants(patcher, weights):
        lora = lora_like_patches(patcher)
        plain_lora = patcher.clone()
        plain_lora.add_patches(lora, 1.0)
        lf, _ = core.patch.apply_linfusion(patcher, weights)
        lf_lora_after = lf.clone()                    # LoRA loaded after Apply LinFusion
        lf_lora_after.add_patches(lora, 1.0)
        lf_lora_before, _ = core.patch.apply_linfusion(plain_lora, weights)   # LoRA before Apply LinFusion
        return {"plain": patcher.clone(), "lf": lf, "plain_lora": plain_lora, "lf_lora_after": lf_lora_after,
                "lf_lora_before": lf_lora_before}

    def fresh(name):
        patcher = build_patcher("sd15")
        out = sample(variants(patcher, linfusion_for(core, patcher.model))[name], seed=11)
        del patcher
        gc.collect()
        return out

    base = build_patcher("sd15")
    models = variants(base, linfusion_for(core, base.model))
    order = ["plain", "lf", "plain_lora", "lf_lora_after", "plain", "lf_lora_before", "plain_lora", "lf",
             "lf_lora_after", "plain"]
    got = {}
    for name in order:
        out = sample(models[name], seed=11)
        assert torch.equal(got.setdefault(name, out), out), f"{name} changed when sampled again"
    expected = {name: fresh(name) for name in got}
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"{name} differs from a fresh run")
    # LoRA deltas on the rest of the model still apply under LinFusion; on attn1 they are unused.
    assert not torch.equal(got["lf"], got["lf_lora_after"])
    assert torch.equal(got["lf_lora_after"], got["lf_lora_before"])


def test_hybrid_threshold_keeps_softmax_on_small_levels(core, sd15):
    base, weights = sd15
    inputs = unet_inputs(base.model, hw=(8, 8))     # levels: 64 and 16 tokens
    plain = run_unet(base, inputs)
    everywhere = run_unet(core.patch.apply_linfusion(base, weights, min_tokens=0)[0], inputs)
    above_all = run_unet(core.patch.apply_linfusion(base, weights, min_tokens=65)[0], inputs)
    between = run_unet(core.patch.apply_linfusion(base, weights, min_tokens=32)[0], inputs)
    assert torch.equal(above_all, plain)
    assert (between - plain).abs().max().item() > 1e-3
    assert (between - everywhere).abs().max().item() > 1e-3


def test_highest_resolution_only(core, sd15):
    base, weights = sd15
    patched, info = core.patch.apply_linfusion(base, weights, blocks="highest resolution only")
    assert "3 of 7" in info                        # the 320-channel level: input 1, output 2 and 3
    install = core.patch.linfusion_install(patched)
    assert {p.site.dim for p in install.placements} == {320}


def test_fifty_apply_sample_unpatch_cycles_do_not_grow_memory(core, sd15):
    import comfy.model_management

    base, weights = sd15
    alive = []
    loaded_before = None
    for i in range(50):
        patched, _ = core.patch.apply_linfusion(base, weights)
        alive.append(weakref.ref(core.patch.linfusion_install(patched).modules))
        sample(patched, seed=i, steps=1, hw=(4, 4))
        sample(base, seed=i, steps=1, hw=(4, 4))       # switching back ejects LinFusion
        del patched
        gc.collect()
        if i == 4:
            loaded_before = len(comfy.model_management.current_loaded_models)
    assert sum(r() is not None for r in alive) <= 1   # every LinFusion module set was freed
    assert len(comfy.model_management.current_loaded_models) <= loaded_before
    assert attn1_instance_forwards(base) == []

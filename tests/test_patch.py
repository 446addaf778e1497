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
    patched, info = core.patching.patch.apply_linfusion(base, weights)
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
        path = core.patching.block_map.attn1_name_map(base.model.model_config.unet_config)[spec.name]
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
    patched, _ = core.patching.patch.apply_linfusion(base, weights)
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
    lf, _ = core.patching.patch.apply_linfusion(base, weights)
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
        lf, _ = core.patching.patch.apply_linfusion(patcher, weights)
        lf_lora_after = lf.clone()                    # LoRA loaded after Apply LinFusion
        lf_lora_after.add_patches(lora, 1.0)
        lf_lora_before, _ = core.patching.patch.apply_linfusion(plain_lora, weights)   # LoRA before Apply LinFusion
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
    everywhere = run_unet(core.patching.patch.apply_linfusion(base, weights, min_tokens=0)[0], inputs)
    above_all = run_unet(core.patching.patch.apply_linfusion(base, weights, min_tokens=65)[0], inputs)
    between = run_unet(core.patching.patch.apply_linfusion(base, weights, min_tokens=32)[0], inputs)
    assert torch.equal(above_all, plain)
    assert (between - plain).abs().max().item() > 1e-3
    assert (between - everywhere).abs().max().item() > 1e-3


def test_highest_resolution_only(core, sd15):
    base, weights = sd15
    patched, info = core.patching.patch.apply_linfusion(base, weights, blocks="highest resolution only")
    assert "3 of 7" in info                        # the 64-channel level: input 1, output 2 and 3
    install = core.patching.patch.linfusion_install(patched)
    assert {p.site.dim for p in install.placements} == {64}


def test_multi_gpu_copy_runs_its_own_linfusion_modules(core, sd15):
    """Newer ComfyUI's multi-GPU deep clone rebuilds each additional model from its `cached_patcher_init`
    factory and injects the copy: the copy must run its own LinFusion modules (on its own device), not the
    modules of the MODEL it was copied from. Done here by hand with the same public patcher calls."""
    base, weights = sd15
    patched, _ = core.patching.patch.apply_linfusion(base, weights)
    inputs = unet_inputs(base.model, hw=(8, 8))
    expected = run_unet(patched, inputs)
    original = patched.get_additional_models_with_key("linfusion")[0]
    factory, args = original.cached_patcher_init
    fresh = factory(*args, disable_dynamic=True)
    assert fresh.model is not original.model
    before = original.model.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())

    copy_ = patched.clone()
    copy_.set_additional_models("linfusion", [fresh])
    calls = {"fresh": 0, "original": 0}
    hooks = [m.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
             for key, owner in (("fresh", fresh), ("original", original)) for m in owner.model.blocks]
    try:
        run_unet(base, inputs)                      # the plain clone ejects the first install
        out = run_unet(copy_, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert calls["fresh"] == len(fresh.model.blocks) and calls["original"] == 0
    assert torch.equal(out, expected)


def test_fifty_apply_sample_unpatch_cycles_do_not_grow_memory(core, sd15):
    import comfy.model_management

    base, weights = sd15
    alive = []
    loaded_before = None
    for i in range(50):
        patched, _ = core.patching.patch.apply_linfusion(base, weights)
        alive.append(weakref.ref(core.patching.patch.linfusion_install(patched).modules))
        sample(patched, seed=i, steps=1, hw=(4, 4))
        sample(base, seed=i, steps=1, hw=(4, 4))       # switching back ejects LinFusion
        del patched
        gc.collect()
        if i == 4:
            loaded_before = len(comfy.model_management.current_loaded_models)
    assert sum(r() is not None for r in alive) <= 1   # every LinFusion module set was freed
    assert len(comfy.model_management.current_loaded_models) <= loaded_before
    assert attn1_instance_forwards(base) == []


def test_attention_patches_compose(core, sd15):
    """attn2 replace (IP-Adapter's mechanism), attn1_patch (gets keys from context, values from value) and
    attn1_output_patch all still run, and LinFusion stays active beside them."""
    from comfy.ldm.modules.attention import optimized_attention

    base, weights = sd15
    inputs = unet_inputs(base.model)
    calls = {"attn2": 0, "attn1": 0, "out": 0}

    def attn2_replace(q, k, v, extra_options):
        calls["attn2"] += 1
        return optimized_attention(q, k, v * 2.0, extra_options["n_heads"])

    def attn1_identity(n, context, value, extra_options):
        calls["attn1"] += 1
        return n, context, value

    def attn1_out_zero(n, extra_options):
        calls["out"] += 1
        return n * 0.0

    lf, _ = core.patching.patch.apply_linfusion(base, weights)
    alone = run_unet(lf, inputs)
    with_attn2 = lf.clone()
    with_attn2.set_model_attn2_replace(attn2_replace, "input", 1)
    plain_attn2 = base.clone()
    plain_attn2.set_model_attn2_replace(attn2_replace, "input", 1)
    out_attn2 = run_unet(with_attn2, inputs, with_attn2.model_options["transformer_options"])
    assert calls["attn2"] > 0 and (out_attn2 - alone).abs().max().item() > 1e-4
    assert (out_attn2 - run_unet(plain_attn2, inputs, plain_attn2.model_options["transformer_options"])
            ).abs().max().item() > 1e-3                        # LinFusion still active with the attn2 patch

    with_attn1 = lf.clone()
    with_attn1.set_model_attn1_patch(attn1_identity)
    assert torch.equal(run_unet(with_attn1, inputs, with_attn1.model_options["transformer_options"]), alone)
    assert calls["attn1"] > 0

    zeroed_lf, zeroed_plain = lf.clone(), base.clone()
    zeroed_lf.set_model_attn1_output_patch(attn1_out_zero)
    zeroed_plain.set_model_attn1_output_patch(attn1_out_zero)
    # The output patch runs after LinFusion: zeroing attn1's output makes LinFusion and softmax agree.
    a = run_unet(zeroed_lf, inputs, zeroed_lf.model_options["transformer_options"])
    b = run_unet(zeroed_plain, inputs, zeroed_plain.model_options["transformer_options"])
    assert calls["out"] > 0 and torch.equal(a, b)


def auto_graph(fixtures, blocks, mode, min_tokens=0, tag=""):
    """checkpoint -> Apply LinFusion (min_tokens_mode given, or left out as in a prompt saved before it
    existed) -> KSampler (64 px, 2 steps); captures the latent and Apply LinFusion's info."""
    inputs = {"model": ["ckpt", 0], "linfusion": ["lf", 0], "blocks": blocks, "min_tokens": min_tokens}
    if mode is not None:
        inputs["min_tokens_mode"] = mode
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "lf": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}},
        "apply": {"class_type": "ApplyLinFusion", "inputs": inputs},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0],
                                                    "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        f"latent_out{tag}": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ks", 0]}},
        f"info_out{tag}": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["apply", 1]}},
    }


def auto_thresholds(info: str) -> dict[int, int]:
    """width -> the token threshold min_tokens auto picked, read from Apply LinFusion's info."""
    import re

    found = {}
    for dim, text in re.findall(r"C=(\d+) \([^)]*\): ([^;]+)", info.split("min_tokens auto", 1)[1]):
        below = re.search(r"softmax below (\d+) tokens", text)
        found[int(dim)] = int(below.group(1)) if below else 0
    return found


def test_min_tokens_auto_equals_the_manual_threshold_it_picked(host, fixtures, core):
    """Through ComfyUI's executor: auto measures a crossover per width, names it in info, and samples exactly
    as the manual min_tokens at that threshold does; a prompt without min_tokens_mode (saved before it
    existed) still validates and runs the manual setting."""
    def run(blocks, mode, min_tokens=0, tag=""):
        res = host.run(auto_graph(fixtures, blocks, mode, min_tokens, tag))
        return res.captured[f"latent_out{tag}"]["samples"], res.captured[f"info_out{tag}"]

    for blocks in ("highest resolution only", "all"):
        auto, info = run(blocks, "auto", tag=f"a{blocks}")
        thresholds = auto_thresholds(info)
        assert thresholds and "min_tokens auto (cpu, float32" in info, info
        if blocks == "highest resolution only":
            assert len(thresholds) == 1
        # levels at 64 px: latent 8 x 8, so the widths' levels see 64, 16 and 4 tokens (SD 1.x layout)
        tokens = {dim: 64 >> (2 * i) for i, dim in enumerate(sorted(thresholds))}
        softmax = {d for d in thresholds if tokens[d] < thresholds[d]}
        linear = set(thresholds) - softmax
        low = max((tokens[d] for d in softmax), default=-1) + 1       # a global min_tokens giving the same split
        high = min((tokens[d] for d in linear), default=1 << 20)
        if low > high:
            continue        # the measured thresholds split the levels in a way no single min_tokens can
        at = next(iter(thresholds.values())) if len(thresholds) == 1 else low     # one width: its own threshold
        manual, _ = run(blocks, "manual", min_tokens=at, tag=f"m{blocks}")
        assert torch.equal(auto, manual)
    legacy, legacy_info = run("all", None, min_tokens=0, tag="legacy")
    everywhere, _ = run("all", "manual", min_tokens=0, tag="manual0")
    assert torch.equal(legacy, everywhere) and "min_tokens auto" not in legacy_info


def h200_attn1_medians() -> dict:
    """docs/benchmarks.json's GPU attn1 rows (an H200, batch 2, old module): median seconds per
    ((family, width, dtype), tokens, backend)."""
    import json
    import statistics
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parent.parent / "docs" / "benchmarks.json").read_text())["gpu"]
    return {((r["family"], r["dim"], r["dtype"]), r["tokens"], r["backend"]): statistics.median(r["times_s"])
            for r in rows["sections"]["attn1"]}


def test_auto_crossover_on_a_gpu_comes_out_near_the_measured_one(core):
    """Fed the H200's attn1 medians as its GPU probes would see them (the ladder from PROBE_TOKENS["other"][0],
    stopping where LinFusion is first faster), min_tokens auto lands between 8K and 24K tokens for all 10 width x
    dtype pairs (their medians cross at ~10-16K). The old probes at 1024 and 4096 tokens, both launch-bound
    there, answered the cap (65,536) for 9 of the 10."""
    from importlib import import_module

    amt = import_module(core.__name__ + ".attention.auto_min_tokens")
    med = h200_attn1_medians()
    pairs = sorted({pair for pair, _, _ in med})
    assert len(pairs) == 10
    found, old = {}, {}
    for pair in pairs:
        probed = []
        for n in sorted({n for p, n, _ in med if p == pair and n >= amt.PROBE_TOKENS["other"][0]}):
            probed.append(n)
            if len(probed) >= 2 and med[pair, n, "linfusion"] <= med[pair, n, "sdpa"]:
                break
        found[pair] = amt.crossover_from_ladder(probed, [med[pair, n, "linfusion"] for n in probed],
                                                [med[pair, n, "sdpa"] for n in probed])
        old[pair] = amt.crossover_from_probes((1024, 4096), tuple(med[pair, n, "linfusion"] for n in (1024, 4096)),
                                              tuple(med[pair, n, "sdpa"] for n in (1024, 4096)))
    assert all(8192 <= n <= 24576 for n in found.values()), found
    assert sum(n == 65536 for n in old.values()) == 9, old


def test_crossover_from_ladder_reads_the_bracketing_probes(core):
    from importlib import import_module

    ladder = import_module(core.__name__ + ".attention.auto_min_tokens").crossover_from_ladder
    inf = float("inf")
    # flat (launch-bound) at 4K and 8K, kernel-bound after: the crossing between 8K and 16K, from those two
    assert ladder((4096, 8192, 16384), (2.0, 2.0, 3.0), (1.0, 1.5, 4.0)) == ladder((8192, 16384), (2.0, 3.0),
                                                                                     (1.5, 4.0))
    assert 8192 < ladder((4096, 8192, 16384), (2.0, 2.0, 3.0), (1.0, 1.5, 4.0)) < 16384
    assert ladder((4096, 8192), (1.0, 2.0), (2.0, 8.0)) < 4096          # faster from the start: below the ladder
    assert ladder((128, 512), (4.0, 16.0), (1.0, 16.0)) == 512          # two probes: the power law, as before
    assert ladder((4096, 8192), (2.0, 4.0), (1.0, 2.0)) == 16 * 8192    # never faster, same growth: the cap
    assert ladder((4096, 8192, 16384), (2.0, 3.0, 5.0), (1.0, 2.0, inf)) == 8192   # softmax out of memory


def test_crossover_from_probes_is_where_the_power_laws_cross(core):
    from importlib import import_module

    cross = import_module(core.__name__ + ".attention.auto_min_tokens").crossover_from_probes
    # linear ~ N, softmax ~ N^2: softmax 4x faster at 128 tokens -> equal at 512
    assert cross((128, 512), (4.0, 16.0), (1.0, 16.0)) == 512
    assert cross((128, 512), (1.0, 4.0), (4.0, 64.0)) == 32           # LinFusion already faster: below the probes
    assert cross((128, 512), (1.0, 4.0), (2.0, 4.0)) == 0             # softmax not growing faster, slower: never
    assert cross((128, 512), (4.0, 16.0), (1.0, 4.0)) == 16 * 512     # softmax faster and not growing faster: the cap

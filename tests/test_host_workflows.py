"""LinFusion through ComfyUI's executor on the fixture checkpoint: toggling across prompts, and composing
with the core nodes users chain with it (LoRA, ControlNet, FreeU, Deep Shrink, SAG, PAG, HyperTile)."""
import gc
import itertools
import logging

import pytest
import torch


def graph(fixtures, *, linfusion=True, lora=False, extra_model=(), controlnet=False, batch=1, seed=0, cfg=5.0,
          min_tokens=0):
    """checkpoint -> [LoRA] -> [Apply LinFusion] -> [model patches] -> KSampler (64 px, 2 steps) -> capture."""
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    model, pos, neg = ["ckpt", 0], ["pos", 0], ["neg", 0]
    if lora:
        p["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": ["ckpt", 1],
                                                            "lora_name": fixtures.lora_sd15, "strength_model": 1.0,
                                                            "strength_clip": 1.0}}
        model = ["lora", 0]
    if linfusion:
        p["lf"] = {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}}
        p["apply"] = {"class_type": "ApplyLinFusion", "inputs": {"model": model, "linfusion": ["lf", 0],
                                                                "blocks": "all", "min_tokens": min_tokens}}
        model = ["apply", 0]
    for i, (class_type, inputs) in enumerate(extra_model):
        p[f"patch{i}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"patch{i}", 0]
    if controlnet:
        p["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fixtures.controlnet_sd15}}
        p["hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                            "color": 0x808080}}
        p["cna"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": pos, "negative": neg, "control_net": ["cn", 0], "image": ["hint", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}}
        pos, neg = ["cna", 0], ["cna", 1]
    p["ks"] = {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": 2, "cfg": cfg,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": pos,
                                                    "negative": neg, "latent_image": ["latent", 0], "denoise": 1.0}}
    p["out"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ks", 0]}}
    return p


_captures = itertools.count()


def latent(host, prompt):
    """The sampled latent. The capture node gets a new id each call: when ComfyUI's cache already holds the
    sampler's output for an identical graph, a new output node still receives it."""
    prompt = dict(prompt)
    out_id = f"out{next(_captures)}"
    prompt[out_id] = prompt.pop("out")
    return host.run(prompt).captured[out_id]["samples"]


def fresh(host, prompt):
    """As after a restart: no cached node outputs, no loaded models."""
    import comfy.model_management
    host.reset_cache()
    comfy.model_management.unload_all_models()
    gc.collect()
    return latent(host, prompt)


def test_toggling_linfusion_and_lora_across_prompts_equals_fresh_runs(host, fixtures):
    """The object-patch trap, at the prompt level: the same cached checkpoint, LinFusion on/off and LoRA
    on/off in alternation; every result must equal the same graph run fresh."""
    variants = {"plain": dict(linfusion=False), "lf": dict(linfusion=True),
                "plain_lora": dict(linfusion=False, lora=True), "lf_lora": dict(linfusion=True, lora=True)}
    expected = {name: fresh(host, graph(fixtures, **kw)) for name, kw in variants.items()}
    host.reset_cache()
    for name in ["plain", "lf", "plain", "lf_lora", "plain_lora", "lf", "lf_lora", "plain"]:
        got = latent(host, graph(fixtures, **variants[name]))
        assert torch.equal(got, expected[name]), f"{name} differs from a fresh run after toggling"
    assert not torch.equal(expected["plain"], expected["lf"])
    assert not torch.equal(expected["lf"], expected["lf_lora"])   # LoRA still reaches attn2/FF under LinFusion


MODULES = 7   # self-attention modules of the SD 1.5 fixture UNet, called in this order per UNet call:
MIDDLE = 2    # input 1, input 3, middle, output 0-3


def _freeu_acts(spy, alone):
    """FreeU re-weights the backbone and skip features entering the output blocks: in the first UNet call the
    LinFusion modules before them see exactly LinFusion-alone's inputs, those in the output blocks do not."""
    first, first_alone = spy.calls[:MODULES], alone.calls[:MODULES]
    assert all(torch.equal(a.x, b.x) for a, b in zip(first[:MIDDLE + 1], first_alone[:MIDDLE + 1]))
    assert not any(torch.equal(a.x, b.x) for a, b in zip(first[MIDDLE + 1:], first_alone[MIDDLE + 1:])), \
        "FreeU did not change what the output blocks' attention saw"


def _deep_shrink_acts(spy, alone):
    """Deep Shrink halves the latent after input block 3 in the first steps: LinFusion's middle-block attention
    sees 2 x 2 = 4 tokens instead of 4 x 4 = 16 (a 64 px image)."""
    assert alone.token_counts() == {64, 16}
    assert 4 in spy.token_counts(), f"LinFusion never saw the shrunk level: {sorted(spy.token_counts())}"


def _pag_acts(spy, alone):
    """PAG adds a perturbed pass whose middle-block attn1 is replaced by identity attention: every module but
    the middle one runs in that extra pass too."""
    per_module, per_module_alone = spy.calls_per_module(), alone.calls_per_module()
    middle, first = spy.calls[MIDDLE].module, spy.calls[0].module
    assert len(set(per_module_alone.values())) == 1          # without PAG every module runs once per UNet call
    assert per_module[first] > per_module_alone[alone.calls[0].module], "PAG's perturbed pass never ran"
    assert per_module[middle] < per_module[first], "PAG's identity attention did not replace the middle attn1"


PATCH_ACTS = {"freeu": _freeu_acts, "deep_shrink": _deep_shrink_acts, "pag": _pag_acts}


@pytest.mark.parametrize("name,kw", [
    ("controlnet", dict(controlnet=True)),
    ("freeu", dict(extra_model=[("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2})])),
    ("deep_shrink", dict(extra_model=[("PatchModelAddDownscale", {
        "block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.35,
        "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bicubic"})])),
    ("pag", dict(extra_model=[("PerturbedAttentionGuidance", {"scale": 3.0})])),
    ("batch_2", dict(batch=2)),
    ("cfg_1", dict(cfg=1.0)),
])
def test_composes_with_core_nodes(host, core, fixtures, name, kw):
    """LinFusion still acts with the other node on, and the other node still acts with LinFusion on (each in
    the way it changes things), so neither was silently dropped."""
    from linfusion_spy import LinFusionSpy

    with LinFusionSpy(core) as spy:
        with_lf = latent(host, graph(fixtures, linfusion=True, **kw))
    without = latent(host, graph(fixtures, linfusion=False, **kw))
    assert torch.isfinite(with_lf).all()
    assert with_lf.shape == without.shape
    assert len(spy.calls) >= 2 * MODULES, "LinFusion's attention did not run in this chain"
    assert (with_lf - without).abs().max().item() > 1e-3, "LinFusion was not active in this chain"
    if name == "batch_2":
        assert {c.x.shape[0] for c in spy.calls} == {4}       # 2 images x (cond, uncond), batched
    if name == "cfg_1":
        assert {c.x.shape[0] for c in spy.calls} == {1}       # ComfyUI skips the uncond pass at CFG 1
    if name in PATCH_ACTS:
        with LinFusionSpy(core) as alone_spy:
            alone = latent(host, graph(fixtures, linfusion=True))
        assert alone_spy.calls, "LinFusion alone was served from ComfyUI's cache: nothing to compare"
        assert (with_lf - alone).abs().max().item() > 1e-3, f"{name} had no effect under LinFusion"
        PATCH_ACTS[name](spy, alone_spy)


def test_self_attention_guidance_runs_and_says_where_linfusion_is_bypassed(host, fixtures, caplog):
    """SAG needs softmax attention maps: it replaces attn1 on the middle block. Pinned behaviour: no crash,
    SAG keeps its softmax attention there (base weights), LinFusion runs everywhere else, and a warning
    says so."""
    sag = [("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})]
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        with_lf = latent(host, graph(fixtures, linfusion=True, extra_model=sag))
    without = latent(host, graph(fixtures, linfusion=False, extra_model=sag))
    assert torch.isfinite(with_lf).all()
    assert (with_lf - without).abs().max().item() > 1e-3
    assert any("replaces attn1 on blocks" in r.getMessage() for r in caplog.records)


def test_lora_on_attn1_is_reported_unused(host, fixtures, caplog):
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        latent(host, graph(fixtures, linfusion=True, lora=True, seed=5))
    assert any("LoRA/weight patches target self-attention" in r.getMessage() for r in caplog.records)


def test_wrong_family_error_reaches_the_user(host, fixtures):
    prompt = graph(fixtures, linfusion=True)
    prompt["lf"]["inputs"]["linfusion_name"] = fixtures.linfusion_folder["sd21"]
    err = host.run(prompt, expect_error=True)
    message = str(err)
    assert fixtures.linfusion_folder["sd21"] in message and "SD2.x" in message and "SD1.x" in message


def test_apply_node_reports_what_it_did(host, fixtures):
    prompt = graph(fixtures, linfusion=True)
    prompt["info"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["apply", 1]}}
    info = host.run(prompt).captured["info"]
    assert "SD1.x" in info and "7 of 7 self-attention modules patched" in info


def test_checkpoint_loader_with_auto_linfusion_equals_the_two_node_chain(host, fixtures):
    chain = graph(fixtures, linfusion=True)
    expected = latent(host, chain)
    one_node = graph(fixtures, linfusion=False)
    one_node["ckpt"] = {"class_type": "CheckpointLoaderLinFusion",
                        "inputs": {"ckpt_name": fixtures.checkpoint["sd15"], "linfusion_name": "auto (match the checkpoint)"}}
    one_node["info"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ckpt", 3]}}
    result = host.run(one_node)
    assert "linfusion_test_sd15" in result.captured["info"] and "SD1.x" in result.captured["info"]
    assert torch.equal(result.captured["out"]["samples"], expected)   # a new graph: every node ran


def test_hypertile_is_exact_under_linfusion(host, core, fixtures, monkeypatch):
    """HyperTile tiles attn1 queries to cut softmax cost. Linear attention reads only a global state per
    image, so under LinFusion every tile gets its image's whole state: the result equals LinFusion alone.
    The spy shows HyperTile did tile: at the 8 x 8 level its attn1 patch handed LinFusion 2 x 2 tiles of
    16 queries each, folded into the batch, against the untiled 64 keys. Tiled queries take the module's
    reference path, so both are compared with every module on that path (and LinFusion alone on its fast path
    against its reference path, to float rounding)."""
    from linfusion_spy import LinFusionSpy

    hypertile = [("HyperTile", {"tile_size": 32, "swap_size": 1, "max_depth": 0, "scale_depth": False})]
    with monkeypatch.context() as m:
        m.setattr(core.attention.fast_path, "fast_path_fits", lambda *args: False)   # every module on one path
        with LinFusionSpy(core) as spy:
            tiled = fresh(host, graph(fixtures, linfusion=True, extra_model=hypertile))
        alone_reference = fresh(host, graph(fixtures, linfusion=True))
    alone = fresh(host, graph(fixtures, linfusion=True))
    softmax_tiled = latent(host, graph(fixtures, linfusion=False, extra_model=hypertile))
    tiles = [c for c in spy.calls if c.x.shape[0] != c.kv_shape[0]]
    # 3 modules at the 64-token level (input 1, output 2 and 3) x 2 UNet calls; batch 2 = cond + uncond.
    assert len(tiles) == 3 * 2, f"HyperTile tiled {len(tiles)} attention calls"
    assert all(c.x.shape[:2] == (2 * 4, 16) and c.kv_shape[:2] == (2, 64) for c in tiles), \
        [(tuple(c.x.shape), c.kv_shape) for c in tiles]
    torch.testing.assert_close(tiled, alone_reference, rtol=1e-4, atol=1e-4)
    # Two steps of a random-weight model amplify the paths' float rounding (~4e-7) to ~3e-6 of the latent's scale.
    assert (alone - alone_reference).abs().max().item() <= 1e-5 * alone.abs().max().item()
    assert (tiled - softmax_tiled).abs().max().item() > 1e-3

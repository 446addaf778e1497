"""The extension on ComfyUI 0.33's GPU default path, DynamicVRAM, run on a CPU (tests/dynamic_vram_mode.py says what
of it runs here and what cannot): every model storage dtype x LinFusion file dtype through Apply LinFusion
(manual and auto), the LinFusion ControlNet, Low-Memory Mode, the Tiled UNet, the tiled VAE and one ladder
stage; and the memory calls and per-GPU copies that differ under it. ComfyUI 0.3.75 has no DynamicVRAM."""
from __future__ import annotations

import gc

import pytest
import torch

from ci_rules import skip_for_host_difference
from controlnet_models import control_inputs, family_controlnet, hint_image, prepared
from dynamic_vram_mode import (CUDA0, dynamic_patcher, dynamic_vram, host_has_dynamic_vram, lazy_layers,
                          loaded_base_model, stored)
from linfusion_models import build_patcher, linfusion_for, unet_inputs
from linfusion_spy import LinFusionSpy

NO_DYNAMIC_VRAM = "0.3.75 has no DynamicVRAM"
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
# (storage, compute): compute None runs the stored dtype, as a GPU runs an fp16/bf16 model; bf16 -> fp32 is
# ComfyUI's manual cast (what a CPU or a GPU without bf16 does).
MODELS = {"fp32": (FP32, None), "fp16": (FP16, None), "bf16": (BF16, None), "bf16 cast to fp32": (BF16, FP32)}
FILES = {"fp16 file": FP16, "fp32 file": FP32}
# Relative error of one UNet call against the fp32 model: rounding of the stored weights and of the compute.
TOLERANCE = {FP32: 1e-5, FP16: 2e-2, BF16: 8e-2}


@pytest.fixture
def dynamic(host):
    if not host_has_dynamic_vram():
        skip_for_host_difference(NO_DYNAMIC_VRAM)
    with dynamic_vram():
        assert lazy_layers()
        yield


@pytest.fixture(scope="module")
def sd15(core):
    """The fp32 reference model, its LinFusion weights, UNet inputs and the reference's LinFusion output, made
    outside the mode (a module fixture is set up before the per-test mode)."""
    reference = build_patcher("sd15")
    weights = linfusion_for(core, reference.model)
    inputs = unet_inputs(reference.model, batch=2, hw=(8, 8))
    return reference, weights, inputs, call_unet(core.patching.patch.apply_linfusion(reference, weights)[0], inputs)


def as_file(core, weights, dtype):
    """The same LinFusion weights as a file saved in `dtype` would give them."""
    return core.weights.checkpoint.LinFusionWeights(weights.source, weights.modules, stored(weights.state_dict, dtype),
                                            weights.config_source)


@torch.no_grad()
def call_unet(patcher, inputs: dict) -> torch.Tensor:
    """One UNet call through ComfyUI's load path and BaseModel.apply_model (which casts the inputs to the
    model's dtype, as sampling does)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher] + patcher.get_nested_additional_models())
    model = patcher.model
    sigma = model.model_sampling.sigma(inputs["t"])
    return model.apply_model(inputs["x"], sigma, c_crossattn=inputs["context"]).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", ["DynamicVRAM", "classic"])
def test_apply_linfusion_every_model_and_file_dtype(core, host, sd15, path, model, file):
    """Before the fix, on the DynamicVRAM path: an fp32 model with an fp16 file crashed ('mat1 and mat2 must have
    the same dtype'), since the weightless layers kept the file's dtype; every min_tokens auto crashed ('weight
    must be Tensor, not NoneType'), since its probe modules were filled through parameters() they do not have
    yet. The classic path (0.33 with --cpu and the other flags, and 0.3.75) must keep working alike."""
    import contextlib

    if path == "DynamicVRAM" and not host_has_dynamic_vram():
        skip_for_host_difference(NO_DYNAMIC_VRAM)
    storage, compute = MODELS[model]
    reference, weights32, inputs, expected = sd15
    weights = as_file(core, weights32, FILES[file])
    with dynamic_vram() if path == "DynamicVRAM" else contextlib.nullcontext():
        assert lazy_layers() == (path == "DynamicVRAM")
        base = core.dynamic_vram.patcher_class()(loaded_base_model(reference.model, storage, compute),
                                                 load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        assert not core.dynamic_vram.is_dynamic(base)    # ModelPatcherDynamic's own reroute for the CPU

        manual, _ = core.patching.patch.apply_linfusion(base, weights, min_tokens=0)
        modules = core.patching.patch.linfusion_install(manual).modules
        assert {p.dtype for p in modules.parameters()} == {storage}, "LinFusion not stored like the model"
        with LinFusionSpy(core) as spy:
            out = call_unet(manual, inputs)
        assert len(spy.calls) == len(modules.blocks)
        assert {c.x.dtype for c in spy.calls} == {compute or storage}
        tolerance = max(TOLERANCE[d] for d in (storage, compute or storage, FILES[file]))
        assert relative(out, expected) <= tolerance

        auto, info = core.patching.patch.apply_linfusion(base, weights, min_tokens="auto")
        assert "min_tokens auto (cpu, " in info
        out_auto = call_unet(auto, inputs)
        assert torch.isfinite(out_auto).all()


def test_linfusion_modules_get_the_hosts_dynamic_patcher(core, sd15, dynamic):
    """Under DynamicVRAM the LinFusion modules ride in a ModelPatcherDynamic, as core's own model patches do, so
    loading the UNet with them keeps ComfyUI's dynamic memory freeing (one classic patcher in a load turns it
    off); a non-dynamic delegate, which ComfyUI builds through cached_patcher_init, gets a classic patcher with
    modules of its own. Before the fix the modules always had a classic ModelPatcher."""
    import comfy.model_patcher

    reference, weights, _, _ = sd15
    base = dynamic_patcher(loaded_base_model(reference.model, FP16))
    patched, _ = core.patching.patch.apply_linfusion(base, weights)
    (modules,) = patched.get_additional_models_with_key("linfusion")
    assert modules.is_dynamic() and modules.load_device == CUDA0
    delegate = modules.clone(disable_dynamic=True)
    assert type(delegate) is comfy.model_patcher.ModelPatcher and delegate.model is not modules.model
    assert all(torch.equal(a, b) for a, b in zip(delegate.model.state_dict().values(),
                                                 modules.model.state_dict().values()))
    assert {p.dtype for p in delegate.model.parameters()} == {FP16}


def test_low_memory_mode_frees_memory_the_dynamic_way(core, sd15, dynamic, monkeypatch):
    """Low-Memory Mode unloads the other models before the UNet loads. With dynamic patchers it asks ComfyUI's
    free_memory as ComfyUI's own loader does for them (for_dynamic: dynamic models give way on demand instead of
    being unloaded whole); with a classic patcher among those kept, the classic way. Before the fix it always
    asked the classic way."""
    import comfy.model_management

    reference, weights, _, _ = sd15
    patched, _ = core.patching.patch.apply_linfusion(dynamic_patcher(loaded_base_model(reference.model, FP16)), weights)
    asked = []
    monkeypatch.setattr(comfy.model_management, "free_memory",
                        lambda memory, device, keep_loaded=[], **kw: asked.append((device, kw)) or [])
    keep = [patched] + patched.get_nested_additional_models()
    assert all(p.is_dynamic() for p in keep)
    core.patching.low_memory.unload_models_besides(keep, CUDA0)
    classic = build_patcher("sd15")
    core.patching.low_memory.unload_models_besides(keep + [classic], CUDA0)
    assert asked == [(CUDA0, {"for_dynamic": True}), (CUDA0, {})]


def test_tiled_vae_reads_free_memory_from_the_patcher(core, hm, dynamic, monkeypatch):
    """The tiled VAE's automatic choice: free memory as the VAE's patcher reports it (0.33; under DynamicVRAM
    that adds what comfy-aimdo can give back), plus what unloading classic models would free; a dynamic model
    is already in the patcher's figure, and an entry whose patcher is gone (ComfyUI holds them weakly) is
    skipped. Before the fix: model_management's figure, dynamic models counted twice, and AttributeError on a
    dead entry."""
    import comfy.model_management
    import comfy.model_patcher

    vae = hm.tiny_vae()
    monkeypatch.setattr(vae, "device", CUDA0)
    monkeypatch.setattr(vae.patcher, "get_free_memory", lambda device: 1000 if device == CUDA0 else -1)
    classic = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=CUDA0, offload_device=CUDA0)
    classic.model.model_loaded_weight_memory = 20
    dynamic_one = dynamic_patcher(torch.nn.Linear(2, 2))
    dynamic_one.model.model_loaded_weight_memory = 300
    gone = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=CUDA0, offload_device=CUDA0)
    entries = [comfy.model_management.LoadedModel(p) for p in (classic, dynamic_one, gone)]
    del gone
    gc.collect()
    assert entries[2].model is None
    monkeypatch.setattr(comfy.model_management, "current_loaded_models", entries)
    assert core.tiling.tiled_vae.available_memory(vae) == 1000 + 20


def controlnet_residuals(core, loaded):
    """The LinFusion ControlNet of the sd15 fixture ControlNet at one step: its residuals and LinFusion's calls."""
    control, base_model, weights = loaded
    patched, _ = core.controlnet.controlnet_patch.apply_linfusion_controlnet(control, weights)
    x, sigma, cond = control_inputs(base_model)
    with LinFusionSpy(core) as spy, torch.no_grad():
        out = prepared(patched, base_model, hint_image(64, 64)).get_control(x, sigma, cond, 1, {})
    return [r for r in out["input"] + out["middle"] if r is not None], len(spy.calls)


def test_linfusion_controlnet_under_dynamic_vram(core, host, fixtures):
    """LinFusion ControlNet built and run with DynamicVRAM on gives the classic path's residuals. The files are
    loaded with it off: a ControlNet file stored in fp16 loads into weightless layers as fp16 in an fp32 model,
    which only a ModelPatcherDynamic casts per op, and that cannot load here (tests/dynamic_vram_mode.py)."""
    if not host_has_dynamic_vram():
        skip_for_host_difference(NO_DYNAMIC_VRAM)
    loaded = family_controlnet(core, fixtures, "sd15")
    classic, classic_calls = controlnet_residuals(core, loaded)
    with dynamic_vram():
        out, calls = controlnet_residuals(core, loaded)
    assert calls == classic_calls > 0
    assert max(relative(a, b) for a, b in zip(out, classic, strict=True)) <= 1e-6


def test_multigpu_cfg_split_copy_of_a_linfusion_controlnet_has_its_own_modules(core, host, fixtures):
    """0.33's MultiGPU CFG Split deep-copies each ControlNet for every extra GPU (deepclone_multigpu, through
    copy()). The copy must carry LinFusion modules loaded for its own GPU, not share the first GPU's (a device
    mismatch), while the original keeps its own; ComfyUI then loads the copy's through get_models(). Before the
    fix the copy shared them."""
    if not host_has_dynamic_vram():
        skip_for_host_difference(NO_DYNAMIC_VRAM)
    control, base_model, weights = family_controlnet(core, fixtures, "sd15")
    patched, _ = core.controlnet.controlnet_patch.apply_linfusion_controlnet(control, weights)
    first = patched.linfusion.patcher
    second_gpu = torch.device("cuda", 1)   # a device object: nothing is loaded on it here
    copy_ = patched.deepclone_multigpu(second_gpu, autoregister=True)
    assert patched.get_instance_for_device(second_gpu) is copy_
    assert patched.linfusion.patcher is first and copy_.linfusion.patcher is not first
    assert copy_.linfusion.patcher.load_device == second_gpu
    ours, theirs = copy_.linfusion.patcher.model, first.model
    assert ours is not theirs and all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                                        theirs.state_dict().values()))
    assert copy_.linfusion.patcher in patched.get_models() and first in patched.get_models()
    # The copy still runs LinFusion, with its own modules.
    x, sigma, cond = control_inputs(base_model)
    prepared_copy = copy_.copy().set_cond_hint(hint_image(64, 64).movedim(-1, 1), 1.0, (0.0, 1.0))
    prepared_copy.pre_run(base_model, lambda p: base_model.model_sampling.percent_to_sigma(p))
    with LinFusionSpy(core) as spy, torch.no_grad():
        prepared_copy.get_control(x, sigma, cond, 1, {})
    assert spy.calls and {c.module for c in spy.calls} <= {id(m) for m in ours.blocks}


def test_skip_residual_sampler_names_a_model_chain_it_cannot_walk(core):
    """The exact skip residual sampler finds model_sampling by walking inner_model (KSamplerX0Inpaint -> CFG
    guider -> model) and says what it found when the chain holds none, instead of an AttributeError."""
    class Level:
        def __init__(self, inner=None):
            self.inner_model = inner

    sampling = core.highres.skip_residual_sampler.find_model_sampling
    model = build_patcher("sd15").model
    assert sampling(Level(Level(model))) is model.model_sampling
    assert sampling(Level(Level(Level(model)))) is model.model_sampling     # one wrapper more
    with pytest.raises(RuntimeError, match=r"found no model_sampling .*\(Level -> Level\)"):
        sampling(Level(Level(None)))


def ladder_stage(core, hm, model, vae, weights, min_tokens_mode):
    """One SD 1.5 ladder stage through the nodes: Apply LinFusion -> Low-Memory Mode -> Tiled UNet (8 px latent
    tiles) -> Progressive Upscale with the exact tiled VAE between the stages (64 px tiles)."""
    import nodes

    from test_highres_progressive import run_node

    mappings = nodes.NODE_CLASS_MAPPINGS
    (model,) = mappings["ApplyLinFusion"]().apply(model, weights, "all", 0, min_tokens_mode)[:1]
    (model,) = mappings["LinFusionLowMemory"]().patch(model, True, 0, True, True, 0)
    (model,) = mappings["LinFusionTiledUNet"]().patch(model, 8, "cpu", mappings["LinFusionTiledUNet"]
                                                      .INPUT_TYPES()["required"]["mode"][0][0])
    latent = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(5)) * 0.5
    attended = []
    cls = core.attention.module.LinFusionAttention
    original = cls.attend      # what the tiled UNet calls per tile (it never calls forward)
    cls.attend = lambda module, *args, **kwargs: attended.append(id(module)) or original(module, *args, **kwargs)
    try:
        out, _ = run_node(model, vae, hm, latent, stages=1, base_steps=6, vae_tile_size=64)
    finally:
        cls.attend = original
    return out["samples"], len(attended)


def test_ladder_stage_low_memory_tiled_unet_and_tiled_vae_under_dynamic_vram(core, hm, host):
    """The high-res path with DynamicVRAM on equals the classic path: an fp32 model, an fp16 LinFusion file (the
    combination that crashed), Low-Memory Mode, the Tiled UNet and the tiled VAE inside one ladder stage; and
    with min_tokens auto it runs."""
    import comfy.model_patcher
    import comfy.sd

    if not host_has_dynamic_vram():
        skip_for_host_difference(NO_DYNAMIC_VRAM)
    reference, vae = hm.unet_patcher(seed=41), hm.tiny_vae()
    weights = as_file(core, linfusion_for(core, reference.model), FP16)
    expected, calls = ladder_stage(core, hm, reference, vae, weights, "manual")
    assert calls > 0
    vae_weights = vae.first_stage_model.state_dict()
    with dynamic_vram():
        model = comfy.model_patcher.CoreModelPatcher(loaded_base_model(reference.model, FP32),
                                                     load_device=reference.load_device,
                                                     offload_device=reference.offload_device)
        lazy_vae = comfy.sd.VAE(sd=vae_weights, config={"params": {"ddconfig": dict(hm.TINY_VAE), "embed_dim": 4}})
        out, dynamic_calls = ladder_stage(core, hm, model, lazy_vae, weights, "manual")
        auto, _ = ladder_stage(core, hm, model, lazy_vae, weights, "auto")
    assert dynamic_calls == calls
    assert relative(out, expected) <= 1e-5
    assert torch.isfinite(auto).all()

"""The extension on ComfyUI 0.33's GPU default path, DynamicVRAM, run on a CPU (tests/dynamic_vram.py says what
of it runs here and what cannot): every model storage dtype x LinFusion file dtype through Apply LinFusion
(manual and auto), the LinFusion ControlNet, Low-Memory Mode, the Tiled UNet, the tiled VAE and one ladder
stage; and the memory calls and per-GPU copies that differ under it. ComfyUI 0.3.75 has no DynamicVRAM."""
from __future__ import annotations

import pytest
import torch

from ci_rules import skip_for_host_difference
from controlnet_models import control_inputs, family_controlnet, hint_image, prepared
from dynamic_vram import (CUDA0, dynamic_patcher, dynamic_vram, host_has_dynamic_vram, lazy_layers,
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
    return reference, weights, inputs, call_unet(core.patch.apply_linfusion(reference, weights)[0], inputs)


def as_file(core, weights, dtype):
    """The same LinFusion weights as a file saved in `dtype` would give them."""
    return core.checkpoint.LinFusionWeights(weights.source, weights.modules, stored(weights.state_dict, dtype),
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
def test_apply_linfusion_every_model_and_file_dtype(core, sd15, dynamic, model, file):
    """Before the fix: an fp32 model with an fp16 file crashed ('mat1 and mat2 must have the same dtype'), since
    the weightless layers kept the file's dtype; every min_tokens auto crashed ('weight must be Tensor, not
    NoneType'), since its probe modules were filled through parameters() they do not have yet."""
    import comfy.model_patcher

    storage, compute = MODELS[model]
    reference, weights32, inputs, expected = sd15
    base = comfy.model_patcher.CoreModelPatcher(loaded_base_model(reference.model, storage, compute),
                                                load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert type(base) is comfy.model_patcher.ModelPatcher     # ModelPatcherDynamic's own reroute for the CPU
    weights = as_file(core, weights32, FILES[file])

    manual, _ = core.patch.apply_linfusion(base, weights, min_tokens=0)
    modules = core.patch.linfusion_install(manual).modules
    assert {p.dtype for p in modules.parameters()} == {storage}, "LinFusion not stored like the model"
    with LinFusionSpy(core) as spy:
        out = call_unet(manual, inputs)
    assert len(spy.calls) == len(modules.blocks)
    assert {c.x.dtype for c in spy.calls} == {compute or storage}
    tolerance = max(TOLERANCE[d] for d in (storage, compute or storage, FILES[file]))
    assert relative(out, expected) <= tolerance

    auto, info = core.patch.apply_linfusion(base, weights, min_tokens="auto")
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
    patched, _ = core.patch.apply_linfusion(base, weights)
    (modules,) = patched.get_additional_models_with_key("linfusion")
    assert modules.is_dynamic() and modules.load_device == CUDA0
    delegate = modules.clone(disable_dynamic=True)
    assert type(delegate) is comfy.model_patcher.ModelPatcher and delegate.model is not modules.model
    assert all(torch.equal(a, b) for a, b in zip(delegate.model.state_dict().values(),
                                                 modules.model.state_dict().values()))
    assert {p.dtype for p in delegate.model.parameters()} == {FP16}

"""LinFusion under ComfyUI's memory modes: fp8 weight storage (what --fp8_e4m3fn-unet or a UNet loader's
weight_dtype gives) and low-VRAM partial loading. The LinFusion modules are comfy.ops layers registered as
an additional model, so ComfyUI stores, casts and partially loads them like the UNet's own layers; these
tests check that it really does."""
import pytest
import torch

from linfusion_models import UNET_CONFIGS, build_patcher, fill_, linfusion_for, run_unet, unet_inputs

FP8 = torch.float8_e4m3fn


class LinFusionDtypes:
    """Records (input dtype, output dtype) of every LinFusion attention call."""

    def __init__(self, core):
        self.cls, self.seen = core.attention.module.LinFusionAttention, []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.cls):
                self.seen.append((args[0].dtype, output.dtype))
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def fp8_stored_patcher(family: str, seed: int = 1):
    """The family's small UNet with its weights stored in fp8 and computed in the dtype ComfyUI picks for
    this device (comfy.model_management.unet_manual_cast), exactly as the fp8 loader options set it up."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cpu = torch.device("cpu")
    compute = comfy.model_management.unet_manual_cast(FP8, cpu)
    class_name, config = UNET_CONFIGS[family]
    model_config = getattr(comfy.supported_models, class_name)(dict(config))
    model_config.set_inference_dtype(FP8, compute)
    model = model_config.get_model({})
    # The same random weights as build_patcher(family, seed), rounded into fp8 storage.
    model.diffusion_model.load_state_dict(fill_(build_patcher(family, seed=seed).model.diffusion_model,
                                                seed).state_dict())
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), compute


def fp8_rounded(state_dict: dict) -> dict:
    return {k: v.to(FP8).to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}


def test_fp8_weight_storage_runs_linfusion_in_the_compute_dtype(core):
    import comfy.model_management

    stored, compute = fp8_stored_patcher("sd15")
    assert compute is not None and compute != FP8 and stored.model.manual_cast_dtype == compute
    weights = linfusion_for(core, stored.model)
    patched, _ = core.patching.patch.apply_linfusion(stored, weights)
    modules = core.patching.patch.linfusion_install(patched).modules
    assert {p.dtype for p in modules.parameters()} == {FP8}            # stored like the UNet: fp8
    inputs = unet_inputs(stored.model, hw=(8, 8))
    with LinFusionDtypes(core) as dtypes:
        out = run_unet(patched, inputs)
    assert len(dtypes.seen) == 7 and set(dtypes.seen) == {(compute, compute)}   # computed in the cast dtype
    assert torch.isfinite(out).all()

    # The same model with every weight (UNet and LinFusion) rounded to fp8 but stored in fp32: the fp8 run
    # must be that model, up to float rounding of the casts.
    reference = build_patcher("sd15")
    reference.model.diffusion_model.load_state_dict(fp8_rounded(stored.model.diffusion_model.state_dict()))
    rounded = core.weights.checkpoint.LinFusionWeights(weights.source, weights.modules, fp8_rounded(weights.state_dict),
                                               weights.config_source)
    expected = run_unet(core.patching.patch.apply_linfusion(reference, rounded)[0], inputs)
    plain = run_unet(reference, inputs)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 1e-4 * scale
    assert (expected - plain).abs().max().item() > 1e-2 * scale            # and LinFusion did act
    comfy.model_management.unload_all_models()


def test_low_vram_partial_load_gives_the_same_output(core):
    """ComfyUI's low-VRAM loading (ModelPatcher.partially_load with a small budget, what load_models_gpu does
    when a model does not fit) leaves most LinFusion layers offloaded and cast per call: same output."""
    import comfy.model_management

    cpu = torch.device("cpu")
    base = build_patcher("sd15", seed=3)
    patched, _ = core.patching.patch.apply_linfusion(base, linfusion_for(core, base.model, seed=4))
    inputs = unet_inputs(base.model, hw=(8, 8))
    full = run_unet(patched, inputs)
    comfy.model_management.unload_all_models()

    modules_patcher = patched.get_additional_models_with_key("linfusion")[0]
    try:
        for p in (patched, modules_patcher):
            p.partially_load(cpu, extra_memory=p.model_size() // 4)
        assert patched.model.model_lowvram and modules_patcher.model.model_lowvram
        cast_per_call = [m for m in modules_patcher.model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert cast_per_call, "no LinFusion layer was left to low-VRAM casting"
        assert patched.is_injected
        with LinFusionDtypes(core) as calls, torch.no_grad():
            out = patched.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"])
        assert len(calls.seen) == 7
        # A module with layers left to per-call casting asks ComfyUI's cast for their weights (attention/fast_path.py):
        # on a CPU the cast hands back the stored tensors (no copy), so it packs them and runs the fast path; on a
        # GPU the cast copies them in each call and the module falls back to the reference path (the two are equal
        # up to float rounding; test_attention_fast covers both).
        cast_modules = [m for m in modules_patcher.model.blocks
                        if any(getattr(layer, "comfy_cast_weights", False) for layer in m.modules())]
        assert cast_modules and all(m._linfusion_packed is not None and not m._linfusion_streamed
                                    and m._linfusion_packed.sources[0] is m.to_q.weight for m in cast_modules)
        torch.testing.assert_close(out, full, rtol=0, atol=1e-5 * full.abs().max().item())
    finally:
        for p in (patched, modules_patcher):
            p.detach()

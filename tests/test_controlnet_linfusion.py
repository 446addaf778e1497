"""LinFusion inside the ControlNet: the patched copy runs LinFusion in every ControlNet self-attention and
nowhere else, leaves the input ControlNet bit-identical, keeps ComfyUI's strength / start-end / chaining, works
under the tiled UNet, and the distilled modules track the ControlNet's own softmax attention better than the
base modules.

Real parts: the SD 1.5 fixture ControlNet file through ComfyUI's loader, SD 2.1 / SDXL-shaped
comfy.cldm.cldm.ControlNet with random weights (tests/controlnet_models.py), ComfyUI's own get_control,
ControlNetApplyAdvanced and sampler.
"""
from __future__ import annotations

import pytest
import torch

from controlnet_models import (control_inputs, family_controlnet, hint_image, prepared, residual_error,
                               residuals)


@pytest.fixture(scope="session")
def controlnets(core, fixtures):
    return {f: family_controlnet(core, fixtures, f) for f in ("sd15", "sd21", "sdxl")}


def linfusion_controlnet(core, control, weights, source="base modules", **kwargs):
    patched, info = core.controlnet.controlnet_distill.linfusion_controlnet(control, weights, source, **kwargs)
    return patched, info


def attention_modules(control_model):
    return {name: m for name, m in control_model.named_modules() if name.endswith((".attn1", ".attn2"))}


class CallLog:
    """Per attention module of the ControlNet: was an instance-level forward (ours) installed when it ran,
    its input and output; and how often each LinFusion module ran."""

    def __init__(self, control_model, linfusion_cls):
        self.modules = attention_modules(control_model)
        self.linfusion_cls = linfusion_cls
        self.calls, self.linfusion_calls, self.handles = [], 0, []

    def __enter__(self):
        for name, m in self.modules.items():
            def hook(module, args, output, name=name):
                self.calls.append((name, "forward" in module.__dict__, args[0].clone(), output.clone()))
            self.handles.append(m.register_forward_hook(hook))

        def count(module, args, output):
            if isinstance(module, self.linfusion_cls):
                self.linfusion_calls += 1
        self.handles.append(torch.nn.modules.module.register_module_forward_hook(count))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_linfusion_runs_in_every_controlnet_self_attention_and_nowhere_else(core, controlnets, family):
    control, base_model, weights = controlnets[family]
    state_before = {k: v.clone() for k, v in control.control_model.state_dict().items()}
    image = hint_image(64, 64)
    inputs = control_inputs(base_model)
    plain_before = residuals(prepared(control, base_model, image), inputs)

    patched, info = linfusion_controlnet(core, control, weights)
    sites = core.controlnet.controlnet_patch.control_sites(control.control_model)
    assert f"{len(sites)} self-attention modules patched" in info
    lf = prepared(patched, base_model, image)
    with CallLog(control.control_model, core.attention.module.LinFusionAttention) as log:
        out = residuals(lf, inputs)
    attn1 = [c for c in log.calls if c[0].endswith("attn1")]
    attn2 = [c for c in log.calls if c[0].endswith("attn2")]
    assert sorted(c[0] for c in attn1) == sorted(s.comfy_path for s in sites)
    assert all(installed for _, installed, _, _ in attn1), "an attn1 ran softmax"
    assert attn2 and not any(installed for _, installed, _, _ in attn2), "a cross-attention was replaced"
    assert log.linfusion_calls == len(sites)
    # Each attn1's output is its LinFusion module's (the base module of the UNet block it mirrors).
    pairs = dict(zip((p.site.comfy_path for p in patched.linfusion.placements), patched.linfusion.patcher.model.blocks))
    for name, _, x, y in attn1:
        with torch.no_grad():
            torch.testing.assert_close(y, pairs[name](x), rtol=1e-4, atol=1e-5)
    assert residual_error(out, plain_before) > 1e-3, "LinFusion changed nothing"

    # The input ControlNet: no forward left installed, weights and output bit-identical.
    assert not any("forward" in m.__dict__ for m in attention_modules(control.control_model).values())
    assert all(torch.equal(v, state_before[k]) for k, v in control.control_model.state_dict().items())
    plain_after = residuals(prepared(control, base_model, image), inputs)
    assert all(torch.equal(a, b) for a, b in zip(plain_after, plain_before, strict=True))
    # Copies of the patched ControlNet (what Apply ControlNet makes) keep LinFusion.
    again = residuals(prepared(patched.copy(), base_model, image), inputs)
    assert all(torch.equal(a, b) for a, b in zip(again, out, strict=True))


def test_strength_start_end_and_chaining_still_act(core, controlnets):
    control, base_model, weights = controlnets["sd15"]
    patched, _ = linfusion_controlnet(core, control, weights)
    image, other = hint_image(64, 64, 1), hint_image(64, 64, 2)
    inputs = control_inputs(base_model, seed=3)
    lf = residuals(prepared(patched, base_model, image), inputs)
    plain = residuals(prepared(control, base_model, other, strength=0.5), inputs)
    # strength scales LinFusion's residuals as it scales softmax ones
    weak = residuals(prepared(patched, base_model, image, strength=0.3), inputs)
    assert all(torch.allclose(w, 0.3 * r, rtol=1e-5, atol=1e-6) for w, r in zip(weak, lf, strict=True))
    # start/end: at sigma_max (0 % of sampling) a 50-100 % range leaves the ControlNet out
    late = prepared(patched, base_model, image, start=0.5, end=1.0)
    sigma_max = float(base_model.model_sampling.sigma_max)
    assert residuals(late, control_inputs(base_model, seed=3, sigma=sigma_max)) == []
    # chained both ways with a plain copy of the same file: each contributes its own residuals
    for first_lf in (False, True):
        prev = prepared(patched if first_lf else control, base_model, image if first_lf else other,
                        strength=1.0 if first_lf else 0.5)
        last = prepared(control if first_lf else patched, base_model, other if first_lf else image,
                        strength=0.5 if first_lf else 1.0, previous=prev)
        chained = residuals(last, inputs)
        for c, a, b in zip(chained, lf, plain, strict=True):
            torch.testing.assert_close(c, a + b, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in attention_modules(control.control_model).values())


def test_wrong_family_and_t2i_adapter(core, controlnets):
    import comfy.controlnet
    import comfy.t2i_adapter.adapter

    control, _, _ = controlnets["sd15"]
    _, _, xl_weights = controlnets["sdxl"]
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match="for SDXL.*ControlNet is SD1.x"):
        linfusion_controlnet(core, control, xl_weights)
    adapter = comfy.controlnet.T2IAdapter(comfy.t2i_adapter.adapter.Adapter(channels=[32, 64], nums_rb=1, cin=192,
                                                                             ksize=1, sk=True, use_conv=False),
                                          3, 8, "nearest-exact", device=torch.device("cpu"))
    same, info = linfusion_controlnet(core, adapter, xl_weights)
    assert same is adapter and "T2I-Adapter" in info and "no attention" in info



def sample_step(model, control=None, image=None, hw=(24, 32), strength=1.0):
    """One sampler step (CFG, euler) with the ControlNet applied by ComfyUI's own Apply ControlNet node."""
    import comfy.sample
    import nodes

    g = torch.Generator().manual_seed(3)
    pos, neg = ([[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(2))
    if control is not None:
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, image, strength, 0.0, 1.0)
    noise = torch.randn(1, 4, *hw, generator=g)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", pos, neg, torch.zeros_like(noise),
                                   last_step=1, disable_pbar=True, seed=3)


def test_node_through_apply_controlnet_the_sampler_and_the_tiled_unet(core, host):
    """The node's output in a real sampling step with a LinFusion UNet; under LinFusion Tiled UNet (the control
    residuals added tile by tile) the step equals the untiled one, and the plain ControlNet is unchanged."""
    from linfusion_models import linfusion_for
    from tiled_unet_models import CONFIGS, model_patcher, random_controlnet, rel_err

    ours = host.extension_module.NODE_CLASS_MAPPINGS
    model = model_patcher(core, "sd15", 11)
    control = random_controlnet(CONFIGS["sd15"], 12)
    weights = linfusion_for(core, model.model, seed=12)
    image = hint_image(24 * 8, 32 * 8, 5)
    patched, info = ours["LinFusionControlNet"]().apply(control, weights, "base modules", 10)
    sites = len(patched.linfusion.placements)
    assert f"{sites} self-attention modules patched" in info

    plain = sample_step(model, control, image)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in patched.linfusion.patcher.model.blocks]
    try:
        ref = sample_step(model, patched, image)
        n_untiled = len(calls)
        (tiled,) = ours["LinFusionTiledUNet"]().patch(model, 12, "cpu", "exact")
        out = sample_step(tiled, patched, image)
    finally:
        for h in hooks:
            h.remove()
    assert n_untiled and n_untiled % sites == 0 and len(calls) == 2 * n_untiled
    assert rel_err(ref, plain) > 1e-3, "the LinFusion ControlNet changed nothing"
    assert rel_err(ref, sample_step(model)) > 1e-3, "the ControlNet had no effect"
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(sample_step(model, control, image), plain) <= 1e-6



def test_controllora_runs_linfusion_in_its_attention(core, host):
    """A ControlLoRA builds its network from the UNet when sampling starts: the modules are placed then, LinFusion
    runs in its attention, and the input ControlLoRA still samples as before."""
    import comfy.controlnet
    from controlnet_models import controlnet_from_unet_config
    from linfusion_models import build_patcher, linfusion_for

    model = build_patcher("sd15")
    weights = linfusion_for(core, model.model, seed=13)
    donor = controlnet_from_unet_config(model.model.model_config.unet_config, seed=14).control_model
    # What a ControlLoRA file holds besides its LoRA deltas: the layers the UNet does not have.
    control_weights = {k: v for k, v in donor.state_dict().items()
                       if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    control_weights["lora_controlnet"] = torch.zeros(1)
    lora = comfy.controlnet.ControlLora(control_weights)
    image = hint_image(64, 64, 6)
    hw = (8, 8)
    plain = sample_step(model, lora, image, hw)
    patched, info = core.controlnet.controlnet_distill.linfusion_controlnet(lora, weights, "distilled for this ControlNet")
    assert "ControlLoRA" in info and "nothing was distilled" in info
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: calls.append(1) if isinstance(m, core.attention.module.LinFusionAttention) else None)
    try:
        out = sample_step(model, patched, image, hw)
    finally:
        handle.remove()
    sites = 3   # input_blocks.1.1, input_blocks.3.1 (the reduced UNet's two levels) and the middle block
    assert calls and len(calls) % sites == 0
    assert (out - plain).abs().max() > 1e-4
    torch.testing.assert_close(sample_step(model, lora, image, hw), plain, rtol=0, atol=1e-6)


DISTILL_STEPS = 30
DISTILL_SIZE = 128   # px: 256 / 64 tokens per sample at the two levels, 8 samples


def layer_errors(distill, control, modules_by_weights, hint, seed=1):
    """Per ControlNet self-attention, on held-out activations (other latents, other noise levels): the relative
    error of each set of modules against the layer's own softmax output."""
    control_model = control.control_model
    first = next(iter(modules_by_weights.values()))
    placements = distill.place_control_modules(first, control_model)
    inputs = distill.teacher_inputs(control, placements, hint, size=DISTILL_SIZE, seed=seed, samples=4,
                                    timesteps=(900.0, 600.0, 300.0, 100.0), device=torch.device("cpu"))
    layers = distill.capture_layers(control_model, placements, inputs)
    out = {}
    for label, weights in modules_by_weights.items():
        with torch.no_grad():
            out[label] = [distill.relative_error(distill.student(weights, p, "cpu")(d.x), d.y)
                          for p, d in zip(distill.place_control_modules(weights, control_model), layers)]
    return [p.site.diffusers_name for p in placements], out


def test_distilled_modules_track_the_controlnets_softmax_attention(core, controlnets, host, tmp_path, monkeypatch):
    import comfy.model_management

    distill = core.controlnet.controlnet_distill
    control, base_model, weights = controlnets["sd21"]
    image = hint_image(DISTILL_SIZE, DISTILL_SIZE, 4)
    host.progress = []
    with torch.inference_mode():   # as ComfyUI runs a node
        distilled, summary = distill.distilled_for_controlnet(control, weights, image, str(tmp_path),
                                                              "my_canny.safetensors", steps=DISTILL_STEPS,
                                                              size=DISTILL_SIZE)
    digest = distill.controlnet_digest(control.control_model)
    saved = tmp_path / f"my_canny-{digest[:12]}.safetensors"
    assert saved.is_file() and distilled.source == str(saved) and "distilled 3 modules" in summary
    layers = len(distilled.modules)
    assert [p[1:] for p in host.progress][-1] == (1 + DISTILL_STEPS * layers, 1 + DISTILL_STEPS * layers)

    names, errors = layer_errors(distill, control, {"base": weights, "distilled": distilled}, image)
    for name, b, d in zip(names, errors["base"], errors["distilled"]):
        print(f"[distill] {name}: relative error vs its softmax attention, base modules {b:.3f} -> distilled {d:.3f}")
        assert d < b, name

    # The ControlNet's residuals (what the UNet receives) move towards the softmax ControlNet's.
    inputs = control_inputs(base_model, hw=(DISTILL_SIZE // 8, DISTILL_SIZE // 8), seed=9)
    softmax = residuals(prepared(control, base_model, image), inputs)
    res = {}
    for label, w in (("base", weights), ("distilled", distilled)):
        patched, info = core.controlnet.controlnet_distill.linfusion_controlnet(control, w, "base modules")
        res[label] = residual_error(residuals(prepared(patched, base_model, image), inputs), softmax)
    print(f"[distill] ControlNet residuals, relative error vs softmax ControlNet: base {res['base']:.4f} -> "
          f"distilled {res['distilled']:.4f}")
    assert res["distilled"] < res["base"]

    # Next time the file is loaded, not fitted again; other settings fit again.
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although a matching file exists")
    monkeypatch.setattr(distill, "distill", no_fit)
    again, summary = distill.distilled_for_controlnet(control, weights, image, str(tmp_path), "my_canny.safetensors",
                                                      steps=DISTILL_STEPS, size=DISTILL_SIZE)
    assert summary.startswith("loaded") and all(torch.equal(again.state_dict[k].float(), v.float())
                                                for k, v in distilled.state_dict.items())
    # the node's path: the saved file is found by the ControlNet's hash and installed
    patched, info = distill.linfusion_controlnet(control, weights, "distilled for this ControlNet", DISTILL_STEPS,
                                                 image, None, "my_canny.safetensors", str(tmp_path))
    assert f"loaded {saved.name}" in info and "3 self-attention modules patched" in info
    assert torch.equal(patched.linfusion.patcher.model.blocks[0].to_q.weight, again.module_state_dict(0)["to_q.weight"])
    monkeypatch.undo()

    # Interrupted: nothing saved, no hook left on the ControlNet, the flag consumed.
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        distill.distilled_for_controlnet(control, weights, image, str(tmp_path), "my_canny", steps=DISTILL_STEPS + 1,
                                         size=DISTILL_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [saved.name]
    assert not any(m._forward_hooks for m in attention_modules(control.control_model).values())
    assert not comfy.model_management.processing_interrupted()

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
    patched, info = core.controlnet_distill.linfusion_controlnet(control, weights, source, **kwargs)
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
    sites = core.controlnet_patch.control_sites(control.control_model)
    assert f"{len(sites)} self-attention modules patched" in info
    lf = prepared(patched, base_model, image)
    with CallLog(control.control_model, core.module.LinFusionAttention) as log:
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
    with pytest.raises(core.checkpoint.LinFusionLoadError, match="for SDXL.*ControlNet is SD1.x"):
        linfusion_controlnet(core, control, xl_weights)
    adapter = comfy.controlnet.T2IAdapter(comfy.t2i_adapter.adapter.Adapter(channels=[32, 64], nums_rb=1, cin=192,
                                                                             ksize=1, sk=True, use_conv=False),
                                          3, 8, "nearest-exact", device=torch.device("cpu"))
    same, info = linfusion_controlnet(core, adapter, xl_weights)
    assert same is adapter and "T2I-Adapter" in info and "no attention" in info

"""ComfyUI's UNet patch hooks under the tiled UNet: called where and as often as the untiled UNet calls them,
with the same result (fp32, <= TOL relative), and a patch key the runner does not know sends the whole call
to the untiled UNet.

Every hook here changes the output substantially (checked against the unpatched UNet) and does something
no tile could do alone (it flips the map), so a dropped or per-tile hook fails. The calls go through the
tiled UNet's DIFFUSION_MODEL wrapper, as a sampler's do; the `runners` fixture records each runner it made
(none: the call went to the untiled UNet).
"""
from __future__ import annotations

import logging

import pytest
import torch

from ci_rules import skip_for_host_difference
from tiled_unet_models import SD15_SMALL, TOL, conds, fill_random, inputs, model_patcher, rel_err, small_unets

# What ComfyUI 0.3.75 lacks (README.md states it): SUPIR, and with it a UNet whose output block patch can
# drop the skip connection.
NO_SUPIR = "ComfyUI 0.3.75 has no SUPIR, and its UNet does not let an output block patch drop the skip connection"
SUPIR_UNET = "sdxl_supir"
HOOKED = "forward_timestep_embed_patch"


def newer_hooks() -> bool:
    """ComfyUI 0.33 calls middle_block_after_patch and forward_timestep_embed_patch on every layer class;
    0.3.75 has no middle_block_after_patch and calls forward_timestep_embed_patch on plain layers only."""
    import comfyui_version
    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:2]) >= (0, 33)


@pytest.fixture(scope="module")
def unets(host, core):
    return small_unets(core)


@pytest.fixture
def runners(core, monkeypatch):
    made = []

    class Recorded(core.tiling.tiled_unet.TiledUNetRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(core.tiling.tiled_unet_patch, "TiledUNetRunner", Recorded)
    return made


def compare(core, unet, options, tile=10, h=36, w=28):
    """(unpatched, untiled, tiled) outputs of one UNet call with transformer_options built by options()."""
    from comfy.patcher_extension import WrappersMP
    x, t, ctx, y = inputs(SD15_SMALL, 2, h, w)
    wrapper = core.tiling.tiled_unet_patch.TiledUNetWrapper(tile, progress=False)
    with torch.no_grad():
        plain = unet(x, t, ctx, y, transformer_options={})
        ref = unet(x, t, ctx, y, transformer_options=options())
        tiled = unet(x, t, ctx, y, transformer_options=dict(
            options(), wrappers={WrappersMP.DIFFUSION_MODEL: {"test": [wrapper]}}))
    return plain, ref, tiled


def test_middle_block_after_patch(core, unets, runners):
    calls = []

    def patch(args):
        calls.append(set(args))
        h = args["h"]
        return {"h": h.flip(-1) + args["emb"][:, :h.shape[1], None, None]}
    plain, ref, out = compare(core, unets["sd15"], lambda: {"patches": {"middle_block_after_patch": [patch]}})
    assert rel_err(out, ref) <= TOL
    called = len(calls) // 2
    assert calls[called:] == calls[:called], "the tiled UNet called the hook a different number of times"
    if newer_hooks():
        assert called == 1 and calls[0] == {"h", "x", "emb", "context", "y", "timesteps", "transformer_options"}
        assert rel_err(ref, plain) > 0.1, "the hook changed nothing: the test could not fail"
        assert len(runners) == 1, "the call did not run tiled"
    else:  # this UNet ignores the hook, so the runner may not call it: the call runs untiled
        assert called == 0 and runners == []


def test_output_block_patch_merging_the_skip_connection(core, unets, runners):
    """An output block patch that merges the skip connection itself returns None for it (as SUPIR's does):
    no concatenation follows."""
    if not newer_hooks():
        skip_for_host_difference(NO_SUPIR)
    calls = []

    def patch(h, hsp, to):
        calls.append(to["block"])
        return torch.cat([h, hsp.flip(-1)], dim=1), None
    plain, ref, out = compare(core, unets["sd15"], lambda: {"patches": {"output_block_patch": [patch]}})
    n_blocks = len(unets["sd15"].output_blocks)
    assert len(calls) == 2 * n_blocks
    assert rel_err(ref, plain) > 0.1, "the patch changed nothing: the test could not fail"
    assert rel_err(out, ref) <= TOL
    assert len(runners) == 1


@pytest.mark.parametrize("layer_class", ["ResBlock", "SpatialTransformer", "Upsample", "Conv2d"])
def test_forward_timestep_embed_patch(core, unets, runners, layer_class):
    """A handler claiming a layer class (isinstance, as ComfyUI matches) runs on the layer's whole input, so
    that layer runs untiled; the others stay tiled. 0.3.75 calls handlers for plain layers (Conv2d) only."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, SpatialTransformer, Upsample
    cls = {"ResBlock": ResBlock, "SpatialTransformer": SpatialTransformer, "Upsample": Upsample,
           "Conv2d": torch.nn.Conv2d}[layer_class]
    calls = []

    def handler(layer, x, emb, context, to, output_shape, time_context, num_video_frames, image_only_indicator):
        calls.append(to["block"])
        x = x.flip(-1)
        if isinstance(layer, ResBlock):
            return layer(x, emb)
        if isinstance(layer, SpatialTransformer):
            return layer(x, context, to)
        if isinstance(layer, Upsample):
            return layer(x, output_shape=output_shape)
        return layer(x)
    unet = unets["sd15"]
    plain, ref, out = compare(core, unet, lambda: {"patches": {HOOKED: [(cls, handler)]}})
    assert rel_err(out, ref) <= TOL
    called = len(calls) // 2
    assert calls[called:] == calls[:called], "the tiled UNet called the handler elsewhere or more often"
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    claimed = sum(isinstance(layer, cls) for block in blocks for layer in block)
    if newer_hooks() or cls is torch.nn.Conv2d:
        assert called == claimed > 0
        assert rel_err(ref, plain) > 1e-2, "the handler changed nothing: the test could not fail"
    else:
        assert called == 0
    (runner,) = runners
    assert sum(name.endswith(HOOKED) for _, name in runner.untiled_layers) == claimed
    assert any(name.startswith("ResBlock") for _, name in runner.untiled_layers) == (cls is ResBlock), \
        "unclaimed layers must stay tiled"


@pytest.mark.parametrize("options,named", [
    ({"patches": {"linfusion_test_patch": [lambda *args: None]}}, "linfusion_test_patch"),
    ({"patches_replace": {"linfusion_test_kind": {("input", 1): lambda *args: None}}},
     "patches_replace.linfusion_test_kind"),
], ids=["patches", "patches_replace"])
def test_unknown_patch_sends_the_whole_call_untiled(core, unets, runners, caplog, options, named):
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        plain, ref, out = compare(core, unets["sd15"], lambda: dict(options))
    assert runners == [], "a patch the runner does not know ran tiled"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(named in w and "whole UNet call runs untiled" in w for w in warnings), warnings
    assert rel_err(out, ref) <= TOL
    # Keys in use only: an empty list or replace table is no patch.
    assert core.tiling.tiled_unet.unhandled_patches({"patches": {"linfusion_test_patch": []},
                                              "patches_replace": {"linfusion_test_kind": {}}}) == []


# ---------------------------------------------------------------- SUPIR (ComfyUI 0.33's core node)
def small_supir(seed):
    """SUPIR's control encoder and adapters, ComfyUI's own classes at a tenth of SUPIR's widths (a full-size
    SUPIR on an SDXL UNet is far too large for CI), as a MODEL_PATCH like Load Model Patch gives. The adapter
    layout is read from ComfyUI's SUPIR() built on the meta device, every width / 10."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.supir.supir_modules import SUPIR, GLVControl, ZeroCrossAttn, ZeroSFT
    ops = comfy.ops.manual_cast  # what ModelPatchLoader builds SUPIR with
    full = SUPIR(device="meta", operations=ops)
    adapters = []
    for m in full.project_modules:
        if isinstance(m, ZeroSFT):
            label_nc, norm_nc = m.mlp_shared[0].in_channels, m.zero_conv.out_channels
            concat = m.param_free_norm.num_channels - norm_nc
            adapters.append(ZeroSFT(label_nc // 10, norm_nc // 10, concat // 10, operations=ops))
        else:
            assert isinstance(m, ZeroCrossAttn)
            adapters.append(ZeroCrossAttn(m.norm2.num_channels // 10, m.norm1.num_channels // 10, operations=ops))
    model = torch.nn.Module()
    model.control_model = GLVControl(model_channels=full.control_model.model_channels // 10, operations=ops)
    model.project_modules = torch.nn.ModuleList(adapters)
    fill_random(model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.CoreModelPatcher(model.eval(), load_device=cpu, offload_device=cpu)


def supir_step(model, h, w):
    import comfy.sample
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, h, w, generator=g)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", conds(SUPIR_UNET, 0),
                                   conds(SUPIR_UNET, 1), torch.zeros(1, 4, h, w), last_step=1, disable_pbar=True,
                                   seed=3)


def test_supir_with_tiled_unet_equals_supir_untiled(core, host, vae, runners):
    """SUPIR (0.33 core: its SUPIR Apply node and SUPIRPatch, which use all three hooks) on a LinFusion SDXL-family
    UNet, one sampler step: plus LinFusion Tiled UNet at its smallest tile it runs and equals SUPIR untiled."""
    if not newer_hooks():
        skip_for_host_difference(NO_SUPIR)
    from comfy_extras.nodes_model_patch import SUPIRApply
    nodes = host.extension_module.NODE_CLASS_MAPPINGS
    h, w = 32, 24
    base = model_patcher(core, SUPIR_UNET, 51)
    image = torch.rand(1, h * 8, w * 8, 3, generator=torch.Generator().manual_seed(4))
    # restore_cfg 0: its post-CFG pull towards the input latent would equal the output to that latent at the
    # first step, whatever the UNet computed.
    supir = SUPIRApply.execute(model=base, model_patch=small_supir(52), vae=vae, image=image, strength_start=1.0,
                               strength_end=1.0, restore_cfg=0.0, restore_cfg_s_tmin=0.05).result[0]
    ref = supir_step(supir, h, w)
    assert rel_err(ref, supir_step(base, h, w)) > 1e-2, "SUPIR changed nothing: the test could not fail"
    (tiled,) = nodes["LinFusionTiledUNet"]().patch(supir, 8, "cpu", "exact")
    out = supir_step(tiled, h, w)
    assert rel_err(out, ref) <= TOL
    assert runners, "the call did not run tiled"
    upsamples = {block for r in runners for block, name in r.untiled_layers if name == f"Upsample: {HOOKED}"}
    assert upsamples == {("output", 2), ("output", 5)}, "SUPIR's cross-attention adapters ran elsewhere"


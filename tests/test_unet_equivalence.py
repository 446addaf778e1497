"""Whole-UNet proof of the block mapping: LinFusion loaded into ComfyUI through our loader node equals a
diffusers UNet2DConditionModel (same weights) whose attn1 modules were replaced, by their diffusers names
from config.json, with the plain reference formula. Plus a meta-device check that the official full-size
module lists (SD1.5 16, SD2.1 16, SDXL 70, mid_block last) land on ComfyUI's full-size UNets."""
import gc

import pytest
import torch

import fixture_models
import reference_unets
from test_module import reference_module_forward


class ReferenceLinFusion(torch.nn.Module):
    """Stands in for a diffusers Attention: the LinFusion formula, straight from the file's tensors."""

    def __init__(self, state_dict, heads):
        super().__init__()
        self.sd = {k: v.float() for k, v in state_dict.items()}
        self.heads = heads

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return reference_module_forward(self.sd, hidden_states, ctx, ctx, self.heads)


def mount_reference(unet, weights):
    """Replace attn1 modules by diffusers name (the file's module_name), as the official code does."""
    for spec in weights.modules:
        parent, leaf = spec.name.rsplit(".", 1)
        setattr(unet.get_submodule(parent), leaf, ReferenceLinFusion(weights.module_state_dict(spec.index), spec.heads))
    return unet


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_unet_matches_diffusers_with_reference_linfusion(core, fixtures, family):
    import comfy.model_management
    import comfy.model_patcher
    import nodes

    weights = nodes.NODE_CLASS_MAPPINGS["LinFusionLoader"]().load(fixtures.linfusion_folder[family])[0]
    base = fixture_models.build_unet_model(family, torch.float32)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(base, cpu, cpu)
    patched = nodes.NODE_CLASS_MAPPINGS["ApplyLinFusion"]().apply(patcher, weights, "all", 0)[0]
    inputs = reference_unets.unet_inputs(family, batch=2, latent_hw=(8, 8))

    comfy.model_management.load_models_gpu([patched] + patched.get_nested_additional_models())
    ours = reference_unets.run_comfy_unet(patched.model.diffusion_model, inputs)
    comfy.model_management.load_models_gpu([patcher])
    plain = reference_unets.run_comfy_unet(patcher.model.diffusion_model, inputs)

    ref = mount_reference(reference_unets.diffusers_unet_from_comfy(family, base.diffusion_model), weights)
    del base
    gc.collect()
    expected = reference_unets.run_diffusers_unet(ref, inputs)
    err = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"[{family}] UNet max abs err {err:.3g} (output max {scale:.3g}); LinFusion changed output by "
          f"{(ours - plain).abs().max().item():.3g}")
    assert err <= 5e-5 * max(1.0, scale)   # measured ~4e-6 (sd15, sd21), ~6e-6 (sdxl)
    assert (ours - plain).abs().max().item() > 100 * err   # LinFusion really ran, on every module checked


FULL_SIZE_DIFFUSERS = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "sdxl": dict(block_out_channels=[320, 640, 1280], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("family,count,model_class", [("sd15", 16, "SD15"), ("sd21", 16, "SD21UnclipH|SD20"),
                                                      ("sdxl", 70, "SDXL")])
def test_official_module_lists_map_onto_full_size_comfy_unets(core, family, count, model_class):
    """Built on the meta device (no memory): the official config's modules, in diffusers named_modules()
    order, are exactly the full-size ComfyUI UNet's attn1 modules with the same dims and heads."""
    import comfy.model_detection
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**FULL_SIZE_DIFFUSERS[family])
    specs = []
    for name, module in ref.named_modules():
        if name.endswith(".attn1"):
            dim = module.to_q.in_features
            mid = dim // 16 if family == "sdxl" else dim
            specs.append(core.weights.checkpoint.ModuleSpec(len(specs), dim, mid, module.heads, name))
    assert len(specs) == count and specs[-1].name.startswith("mid_block")

    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(ref.state_dict())
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    assert type(model_config).__name__ in model_class.split("|")
    base = model_config.get_model({}, device="meta")
    weights = core.weights.checkpoint.LinFusionWeights(f"official_{family}", specs, {}, "config.json")
    assert weights.family == {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL"}[family]
    placements = core.patching.placement.place_modules(weights, base)
    assert len(placements) == count
    assert {p.site.comfy_path for p in placements} == {
        n for n, m in base.diffusion_model.named_modules() if n.endswith(".attn1")}
    assert placements[-1].site.comfy_path.startswith("middle_block.1.")
    first = placements[0]
    assert (first.spec.name, first.site.comfy_path) == ("down_blocks.0.attentions.0.transformer_blocks.0.attn1"
                                                        if family != "sdxl" else
                                                        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                                        "input_blocks.1.1.transformer_blocks.0.attn1"
                                                        if family != "sdxl" else
                                                        "input_blocks.4.1.transformer_blocks.0.attn1")

"""Loading LinFusion files in every layout users have, and clear errors for every bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from linfusion_models import build_patcher, hub_config, linfusion_for, run_unet, unet_inputs


@pytest.fixture(scope="module")
def models(core):
    return {"sd15": build_patcher("sd15"), "sd21": build_patcher("sd21", seed=2), "sdxl": build_patcher("sdxl", seed=3)}


@pytest.fixture(scope="module")
def folder(core, models, tmp_path_factory):
    """A models/linfusion folder with each family's weights in the three layouts, plus broken files."""
    import folder_paths

    root = tmp_path_factory.mktemp("linfusion")
    for family, patcher in models.items():
        weights = linfusion_for(core, patcher.model, seed=11)
        sd = {k: v.half().contiguous() for k, v in weights.state_dict.items()}
        config = json.dumps(hub_config(weights))
        hub = root / f"hub_{family}"
        hub.mkdir()
        (hub / "config.json").write_text(config)
        save_file(sd, str(hub / "diffusion_pytorch_model.safetensors"))
        save_file(sd, str(root / f"single_{family}.safetensors"), metadata={"linfusion_config": config})
        save_file(sd, str(root / f"bare_{family}.safetensors"))
    good = (root / "single_sd15.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "not_safetensors.safetensors").write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors" * 10)
    sd15 = linfusion_for(core, models["sd15"].model, seed=11)
    sd = {k: v.half().contiguous() for k, v in sd15.state_dict.items()}
    bad_config = hub_config(sd15)
    bad_config["modules_list"][2]["dim_n"] = 1280
    save_file(sd, str(root / "config_disagrees.safetensors"), metadata={"linfusion_config": json.dumps(bad_config)})
    short_config = hub_config(sd15)
    short_config["modules_list"].pop()
    save_file(sd, str(root / "config_too_short.safetensors"), metadata={"linfusion_config": json.dumps(short_config)})
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 4)},
              str(root / "a_lora.safetensors"))
    folder_paths.add_model_folder_path("linfusion", str(root))
    return root


def load(core, name):
    from_node = __import__("nodes").NODE_CLASS_MAPPINGS["LinFusionLoader"]()
    return from_node.load(name)[0]


def test_loader_lists_hub_folders_and_files(core, folder):
    import nodes

    choices = nodes.NODE_CLASS_MAPPINGS["LinFusionLoader"].INPUT_TYPES()["required"]["linfusion_name"][0]
    assert {"hub_sd15", "single_sd15.safetensors", "bare_sd15.safetensors"} <= set(choices)
    assert not any(c.endswith("diffusion_pytorch_model.safetensors") for c in choices)


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_three_layouts_load_and_give_the_same_unet(core, models, folder, family):
    patcher = models[family]
    inputs = unet_inputs(patcher.model, hw=(8, 8))
    outs = {}
    for layout in ("hub", "single", "bare"):
        name = f"{layout}_{family}" + ("" if layout == "hub" else ".safetensors")
        weights = load(core, name)
        assert weights.config_source == {"hub": "config.json", "single": "metadata", "bare": "weights only"}[layout]
        patched, info = core.patch.apply_linfusion(patcher, weights)
        assert f"{len(weights.modules)} of {len(weights.modules)}" in info
        outs[layout] = run_unet(patched, inputs)
    assert torch.equal(outs["hub"], outs["single"])
    # A bare file rebuilds names (diffusers order, mid_block last) and heads from the model: same result.
    assert torch.equal(outs["hub"], outs["bare"])
    assert (outs["hub"] - run_unet(patcher, inputs)).abs().max().item() > 1e-3


def test_family_detected_from_config(core, folder):
    assert load(core, "hub_sd15").family == "SD1.x"
    assert load(core, "hub_sd21").family == "SD2.x"
    assert load(core, "hub_sdxl").family == "SDXL"
    assert load(core, "bare_sd15.safetensors").family == "SD1.x/SD2.x"


@pytest.mark.parametrize("name,needle", [
    ("truncated.safetensors", "truncated.safetensors"),
    ("not_safetensors.safetensors", "not a readable safetensors"),
    ("config_disagrees.safetensors", "do not belong together"),
    ("config_too_short.safetensors", "lists 6 modules but the weights hold 7"),
    ("a_lora.safetensors", "Is it a LoRA"),
])
def test_bad_files_raise_naming_the_file(core, folder, name, needle):
    with pytest.raises(core.checkpoint.LinFusionLoadError) as err:
        load(core, name)
    assert name in str(err.value) and needle in str(err.value)


def test_non_safetensors_extension_refused(core, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(core.checkpoint.LinFusionLoadError, match="weights.bin.*not a .safetensors"):
        core.checkpoint.load_linfusion(str(path))


@pytest.mark.parametrize("weights_family,model_family,found,expected", [
    ("sdxl", "sd15", "SDXL", "SD1.x"), ("sd15", "sdxl", "SD1.x", "SDXL"), ("sd15", "sd21", "SD1.x", "SD2.x"),
    ("sd21", "sd15", "SD2.x", "SD1.x"), ("sdxl", "sd21", "SDXL", "SD2.x"),
])
def test_wrong_family_names_file_found_and_expected(core, models, folder, weights_family, model_family, found,
                                                    expected):
    base = models[model_family]
    weights = load(core, f"hub_{weights_family}")
    with pytest.raises(core.checkpoint.LinFusionLoadError) as err:
        core.patch.apply_linfusion(base, weights)
    message = str(err.value)
    assert f"hub_{weights_family}" in message
    assert f"weights for {found}" in message and f"the model is {expected}" in message
    # Nothing half-patched: the input model carries no LinFusion parts.
    assert not base.injections and not base.additional_models


def test_bare_sdxl_weights_on_sd15_model(core, models, folder):
    with pytest.raises(core.checkpoint.LinFusionLoadError, match="bare_sdxl.*SDXL.*SD1.x"):
        core.patch.apply_linfusion(models["sd15"], load(core, "bare_sdxl.safetensors"))


@pytest.mark.parametrize("kind", ["Flux", "SD3"])
def test_unsupported_model_families(core, kind):
    import comfy.model_patcher
    import comfy.supported_models

    configs = {
        "Flux": {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
                 "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                 "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
                 "guidance_embed": False},
        "SD3": {"in_channels": 16, "pos_embed_scaling_factor": None, "pos_embed_offset": None, "patch_size": 2,
                "out_channels": 16, "depth": 1, "num_patches": 64, "pos_embed_max_size": 8,
                "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64,
                                                                                     "out_features": 64}},
                "adm_in_channels": 64},
    }
    model_config = getattr(comfy.supported_models, kind)(configs[kind])
    model = model_config.get_model({}, device="meta")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, cpu, cpu)
    with pytest.raises(core.checkpoint.LinFusionLoadError, match=f"SD1.x, SD2.x and SDXL UNets; this model is {kind}"):
        core.patch.apply_linfusion(patcher, core.checkpoint.LinFusionWeights("x.safetensors", [], {}))
    assert not patcher.injections

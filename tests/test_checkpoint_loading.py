"""Loading LinFusion files in every layout users have, and clear errors for every bad input."""
import dataclasses
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
        patched, info = core.patching.patch.apply_linfusion(patcher, weights)
        assert f"{len(weights.modules)} of {len(weights.modules)}" in info
        outs[layout] = run_unet(patched, inputs)
    assert torch.equal(outs["hub"], outs["single"])
    # A bare file rebuilds names (diffusers order, mid_block last) and heads from the model: same result.
    assert torch.equal(outs["hub"], outs["bare"])
    assert (outs["hub"] - run_unet(patcher, inputs)).abs().max().item() > 1e-3


def test_family_detected_from_config(core, folder):
    assert load(core, "hub_sd15").family == "SD1.x"
    assert load(core, "hub_sd21").family == "SD2.x"
    assert load(core, "single_sd21.safetensors").family == "SD2.x"      # config from metadata
    assert load(core, "hub_sdxl").family == "SDXL"
    assert load(core, "bare_sdxl.safetensors").family == "SDXL"         # XL's MLP widths show it
    assert load(core, "bare_sd15.safetensors").family == "SD1.x/SD2.x"
    # Load LinFusion's info says which: known, or to be assumed from the model.
    assert "family SD2.x" in load(core, "hub_sd21").describe()
    assert "ASSUMED" in load(core, "bare_sd21.safetensors").describe()
    assert "ASSUMED" not in load(core, "single_sd21.safetensors").describe()


def test_sd1_and_sd2_bare_files_have_identical_tensors(core, folder):
    """Why a config-less SD 1.x / SD 2.x file cannot be told apart: same keys, same shapes, and no tensor
    carries the head count (heads only split the channel axis inside the forward pass)."""
    from safetensors import safe_open

    def shapes(name):
        with safe_open(str(folder / name), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}

    sd15, meta15 = shapes("bare_sd15.safetensors")
    sd21, meta21 = shapes("bare_sd21.safetensors")
    assert sd15 == sd21 and "linfusion_config" not in meta15 and "linfusion_config" not in meta21


@pytest.mark.parametrize("weights_family,model_family,heads", [("sd21", "sd15", {8}), ("sd15", "sd21", {1, 2})])
def test_bare_file_on_the_other_family_says_the_family_was_assumed(core, models, folder, caplog, weights_family,
                                                                   model_family, heads):
    """A renamed file without config runs with the model's heads (nothing can show it is wrong) and both the
    info output and a WARNING say that the family was assumed; with a config (folder or metadata) the same
    weights stop with the wrong-family error."""
    import logging

    base = models[model_family]
    name = f"bare_{weights_family}.safetensors"
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        patched, info = core.patching.patch.apply_linfusion(base, load(core, name))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "family ASSUMED from the model" in info and name in info
    assert any("family ASSUMED from the model" in w and name in w for w in warnings), warnings
    assert {p.site.heads for p in core.patching.patch.linfusion_install(patched).placements} == heads   # the model's
    for config_layout in (f"hub_{weights_family}", f"single_{weights_family}.safetensors"):
        with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match="Load the LinFusion weights made for"):
            core.patching.patch.apply_linfusion(base, load(core, config_layout))


def test_files_with_a_config_do_not_warn(core, models, folder, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        _, info = core.patching.patch.apply_linfusion(models["sd21"], load(core, "single_sd21.safetensors"))
        _, info_xl = core.patching.patch.apply_linfusion(models["sdxl"], load(core, "bare_sdxl.safetensors"))
    assert "ASSUMED" not in info and "ASSUMED" not in info_xl
    assert not [r for r in caplog.records if "ASSUMED" in r.getMessage()]


@pytest.mark.parametrize("name,needle", [
    ("truncated.safetensors", "truncated.safetensors"),
    ("not_safetensors.safetensors", "not a readable safetensors"),
    ("config_disagrees.safetensors", "do not belong together"),
    ("config_too_short.safetensors", "lists 6 modules but the weights hold 7"),
    ("a_lora.safetensors", "Is it a LoRA"),
])
def test_bad_files_raise_naming_the_file(core, folder, name, needle):
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError) as err:
        load(core, name)
    assert name in str(err.value) and needle in str(err.value)


def test_non_safetensors_extension_refused(core, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match="weights.bin.*not a .safetensors"):
        core.weights.checkpoint.load_linfusion(str(path))


@pytest.mark.parametrize("weights_family,model_family,found,expected", [
    ("sdxl", "sd15", "SDXL", "SD1.x"), ("sd15", "sdxl", "SD1.x", "SDXL"), ("sd15", "sd21", "SD1.x", "SD2.x"),
    ("sd21", "sd15", "SD2.x", "SD1.x"), ("sdxl", "sd21", "SDXL", "SD2.x"),
])
def test_wrong_family_names_file_found_and_expected(core, models, folder, weights_family, model_family, found,
                                                    expected):
    base = models[model_family]
    weights = load(core, f"hub_{weights_family}")
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError) as err:
        core.patching.patch.apply_linfusion(base, weights)
    message = str(err.value)
    assert f"hub_{weights_family}" in message
    assert f"weights for {found}" in message and f"the model is {expected}" in message
    # Nothing half-patched: the input model carries no LinFusion parts.
    assert not base.injections and not base.additional_models


def test_bare_sdxl_weights_on_sd15_model(core, models, folder):
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match="bare_sdxl.*SDXL.*SD1.x"):
        core.patching.patch.apply_linfusion(models["sd15"], load(core, "bare_sdxl.safetensors"))


@pytest.mark.parametrize("kind", ["Flux", "SD3"])
def test_unsupported_model_families(core, kind):
    import comfy.ldm.flux.model
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
    # What the host's own detection gives a Flux.1 checkpoint: ComfyUI 0.3.76 added FluxParams.txt_ids_dims
    # (no text position ids for Flux.1), a field 0.3.75 does not have.
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        configs["Flux"]["txt_ids_dims"] = []
    model_config = getattr(comfy.supported_models, kind)(configs[kind])
    model = model_config.get_model({}, device="meta")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, cpu, cpu)
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match=f"SD1.x, SD2.x and SDXL UNets; this model is {kind}"):
        core.patching.patch.apply_linfusion(patcher, core.weights.checkpoint.LinFusionWeights("x.safetensors", [], {}))
    assert not patcher.injections


def hub_folder(root, name, config_text, weights=None, weights_name="diffusion_pytorch_model.safetensors"):
    path = root / name
    path.mkdir()
    if config_text is not None:
        (path / "config.json").write_text(config_text)
    if weights is not None:
        save_file({k: v.half().contiguous() for k, v in weights.state_dict.items()}, str(path / weights_name))
    return path


def _config_variants(config):
    import copy

    def edit(fn):
        c = copy.deepcopy(config)
        fn(c)
        return json.dumps(c)
    return {
        "not json": ("{'modules_list': [", "it is not JSON"),
        "a list": (json.dumps([config]), "it has no modules_list list"),
        "heads as text": (edit(lambda c: c["modules_list"][1].update(heads="8")), "modules_list[1] has non-integer heads='8'"),
        "heads null": (edit(lambda c: c["modules_list"][0].update(heads=None)), "modules_list[0] has non-integer heads=None"),
        "entry not an object": (edit(lambda c: c["modules_list"].__setitem__(2, "attn1")), "modules_list[2] is str"),
        "no module_name": (edit(lambda c: c["modules_list"][3].pop("module_name")), "modules_list[3] lacks module_name"),
        "mid dim as text": (edit(lambda c: c["modules_list"][0].update(projection_mid_dim="64")),
                            "non-integer projection_mid_dim='64'"),
    }


@pytest.mark.parametrize("variant", ["not json", "a list", "heads as text", "heads null", "entry not an object",
                                     "no module_name", "mid dim as text"])
def test_malformed_config_json_names_the_folder_and_the_field(core, models, tmp_path, variant):
    weights = linfusion_for(core, models["sd15"].model, seed=11)
    text, needle = _config_variants(hub_config(weights))[variant]
    folder = hub_folder(tmp_path, "LinFusion-1-5", text, weights)
    for read in (core.weights.checkpoint.load_linfusion, core.weights.checkpoint.peek_linfusion):
        with pytest.raises(core.weights.checkpoint.LinFusionLoadError) as err:
            read(str(folder), display_name="LinFusion-1-5")
        message = str(err.value)
        assert "'LinFusion-1-5'" in message and "config.json" in message and needle in message, message


def test_hub_folder_without_weights(core, models, tmp_path):
    weights = linfusion_for(core, models["sd15"].model, seed=11)
    config = json.dumps(hub_config(weights))
    only_config = hub_folder(tmp_path, "only_config", config)
    for read in (core.weights.checkpoint.load_linfusion, core.weights.checkpoint.peek_linfusion):
        with pytest.raises(core.weights.checkpoint.LinFusionLoadError,
                           match="folder 'only_config' has no diffusion_pytorch_model.safetensors .found: no weight "
                                 "files.*download both files"):
            read(str(only_config), display_name="only_config")
    # A diffusers variant name beside config.json (the folder is then listed as that file): the config is used.
    variant = hub_folder(tmp_path, "variant", config, weights, "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError, match="found: diffusion_pytorch_model.fp16.safetensors"):
        core.weights.checkpoint.load_linfusion(str(variant), display_name="variant")
    loaded = core.weights.checkpoint.load_linfusion(str(variant / "diffusion_pytorch_model.fp16.safetensors"))
    assert loaded.config_source == "config.json" and loaded.family == "SD1.x"


@pytest.fixture
def only_these_linfusion_files(monkeypatch, tmp_path):
    """models/linfusion reduced to one empty folder the test fills (ComfyUI's own folder registry)."""
    import folder_paths

    root = tmp_path / "linfusion_only"
    root.mkdir()
    _, extensions = folder_paths.folder_names_and_paths["linfusion"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "linfusion", ([str(root)], extensions))
    monkeypatch.delitem(folder_paths.filename_list_cache, "linfusion", raising=False)
    yield root
    folder_paths.filename_list_cache.pop("linfusion", None)


def test_auto_picker_with_only_wrong_family_files(core, models, only_these_linfusion_files, caplog):
    """Load Checkpoint + LinFusion's 'auto' on an SD 1.5 model when models/linfusion holds only SD 2.x and SDXL
    weights with configs: the released SD 1.5 set (downloaded on load), and once a folder of that name holds the
    wrong weights too, an error that names every file and why it does not fit. A config-less SD1/SD2 file
    does fit (nothing shows otherwise) and is picked with the 'assumed' warning; a file with the right config
    wins over it."""
    import logging
    import sys
    import nodes

    pick = sys.modules[nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderLinFusion"].__module__].pick_linfusion
    root = only_these_linfusion_files
    sd15 = models["sd15"].model
    for family in ("sd21", "sdxl"):
        weights = linfusion_for(core, models[family].model, seed=11)
        hub_folder(root, f"LinFusion-{family}", json.dumps(hub_config(weights)), weights)
    # Nothing on disk fits: auto falls back to the released set of the model's family (downloaded on load).
    assert pick(sd15) == "LinFusion-1-5"
    # The released set's folder is there but holds another family's weights: nothing left to fall back to.
    wrong = linfusion_for(core, models["sd21"].model, seed=12)
    hub_folder(root, "LinFusion-1-5", json.dumps(hub_config(wrong)), wrong)
    with pytest.raises(core.weights.checkpoint.LinFusionLoadError) as err:
        pick(sd15)
    message = str(err.value)
    assert "no LinFusion weights in models/linfusion fit this SD1.x (SD15) checkpoint" in message
    assert "LinFusion-sd21: " in message and "LinFusion-sdxl: " in message and "LinFusion-1-5: " in message
    assert "weights for SD2.x" in message and "weights for SDXL" in message

    bare = linfusion_for(core, models["sd21"].model, seed=11)
    save_file({k: v.half().contiguous() for k, v in bare.state_dict.items()}, str(root / "renamed.safetensors"))
    assert pick(sd15) == "renamed.safetensors"
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        _, info = core.patching.patch.apply_linfusion(models["sd15"], load(core, "renamed.safetensors"))
    assert "ASSUMED" in info and any("ASSUMED" in r.getMessage() for r in caplog.records)

    right = linfusion_for(core, sd15, seed=11)
    hub_folder(root, "LinFusion-sd15", json.dumps(hub_config(right)), right)
    assert pick(sd15) == "LinFusion-sd15"


def test_invalid_blocks_value(core, models, host, fixtures):
    """Apply LinFusion's `blocks`: ComfyUI's validation refuses a value outside the list before anything runs;
    the engine refuses it too (for callers without validation), before the model is cloned."""
    base = models["sd15"]
    weights = linfusion_for(core, base.model)
    with pytest.raises(ValueError, match="blocks must be one of .'all', 'highest resolution only'., got 'middle'"):
        core.patching.patch.apply_linfusion(base, weights, blocks="middle")
    assert not base.injections and not base.additional_models

    prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
              "lf": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}},
              "apply": {"class_type": "ApplyLinFusion", "inputs": {"model": ["ckpt", 0], "linfusion": ["lf", 0],
                                                                   "blocks": "middle", "min_tokens": 0}},
              "out": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["apply", 1]}}}
    ok, error, _, node_errors = host.run(prompt, expect_error=True)
    assert not ok
    blocks_errors = [e for e in node_errors.get("apply", {}).get("errors", [])
                     if e["extra_info"].get("input_name") == "blocks"]
    assert blocks_errors and blocks_errors[0]["type"] == "value_not_in_list", node_errors

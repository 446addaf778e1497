"""The fixture files are what they claim to be, judged by ComfyUI's own loaders and detection."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import fixture_models
import reference_unets

sdxl = pytest.mark.sdxl  # needs the SDXL-family checkpoint (3.5 GB, generated on first use)

EXPECTED_MODEL_CLASS = {"sd15": "SD15", "sd21": "SD20", "sdxl": "Segmind_Vega"}
EXPECTED_LINFUSION_MODULES = {"sd15": 7, "sd21": 22, "sdxl": 15}


def _no_load_warnings(caplog) -> None:
    bad = [r.getMessage() for r in caplog.records
           if any(w in r.getMessage().lower() for w in ("missing", "left over", "leftover", "not loaded"))
           and "torchaudio" not in r.getMessage()]
    assert not bad, f"ComfyUI reported incomplete loading: {bad[:3]}"


@pytest.mark.parametrize("family", ["sd15", "sd21", pytest.param("sdxl", marks=sdxl)])
def test_checkpoint_detected_by_comfyui(fixtures, family, caplog):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models

    path = fixtures.path("checkpoint", fixtures.checkpoint[family])
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    _no_load_warnings(caplog)
    config = model.model.model_config
    assert type(config).__name__ == EXPECTED_MODEL_CLASS[family]
    detected = {k: v for k, v in config.unet_config.items() if k != "dtype"}
    assert detected == fixtures.unet_config[family]
    expected_type = comfy.model_base.ModelType.V_PREDICTION if family == "sd21" else comfy.model_base.ModelType.EPS
    assert model.model.model_type == expected_type
    if family == "sdxl":
        assert isinstance(config, comfy.supported_models.SDXL)
    assert clip is not None and vae is not None


@pytest.mark.slow
def test_sd15_txt2img_end_to_end(host, fixtures):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["6", 0]}},
    }
    image = host.run(prompt).captured["7"]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0, "the decoded image is constant: the random weights do not reach the output"


@pytest.mark.parametrize("family", fixture_models.FAMILIES)
def test_linfusion_files_match_hub_layout(fixtures, family):
    import comfy.utils
    import safetensors

    config = fixtures.linfusion_config[family]
    modules = config["modules_list"]
    assert len(modules) == EXPECTED_LINFUSION_MODULES[family]
    names = [m["module_name"] for m in modules]
    assert all(n.endswith(".attn1") for n in names)
    # diffusers named_modules() order: every down block, then every up block, the mid block last.
    kinds = [n.split(".")[0] for n in names]
    assert kinds == sorted(kinds, key=["down_blocks", "up_blocks", "mid_block"].index)
    for m in modules:
        assert m["heads"] == (8 if family == "sd15" else m["dim_n"] // 64)
        assert m["projection_mid_dim"] == (m["dim_n"] // 16 if family == "sdxl" else None)

    # Every module name is a real attn1 of the ComfyUI UNet, through ComfyUI's own name map.
    to_comfy = reference_unets.diffusers_key_map(family)
    comfy_keys = set(fixture_models.build_unet_model(family, fill=False, device="meta").diffusion_model.state_dict())
    for n in names:
        assert to_comfy[f"{n}.to_q.weight"] in comfy_keys

    folder = fixtures.path("linfusion", fixtures.linfusion_folder[family])
    assert json.loads((folder / "config.json").read_text()) == config
    tensors = comfy.utils.load_torch_file(str(folder / "diffusion_pytorch_model.safetensors"))
    expected = {k for i, m in enumerate(modules) for k in fixture_models.linfusion_keys(i, m["projection_mid_dim"])}
    assert set(tensors) == expected
    assert len(tensors) == 17 * len(modules)
    for i, m in enumerate(modules):
        c, mid = m["dim_n"], m["projection_mid_dim"] or m["dim_n"]
        assert tensors[f"{i}.to_q.weight"].shape == (c, c)
        assert tensors[f"{i}.to_k_.0.weight"].shape == (mid, c)
        assert tensors[f"{i}.to_k_.3.weight"].shape == (c, mid)
    assert all(t.dtype == torch.float16 for t in tensors.values())

    single = fixtures.path("linfusion", fixtures.linfusion_single[family])
    bare = fixtures.path("linfusion", fixtures.linfusion_bare[family])
    for path in (single, bare):
        other = comfy.utils.load_torch_file(str(path))
        assert other.keys() == tensors.keys()
        assert all(torch.equal(other[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(str(single), "pt") as fh:
        assert json.loads(fh.metadata()[fixture_models.LINFUSION_CONFIG_METADATA_KEY]) == config
    with safetensors.safe_open(str(bare), "pt") as fh:
        assert fixture_models.LINFUSION_CONFIG_METADATA_KEY not in (fh.metadata() or {})


def test_linfusion_weights_are_deterministic():
    config = fixture_models.linfusion_config("sd15")
    a = fixture_models.linfusion_state_dict("sd15", config)
    b = fixture_models.linfusion_state_dict("sd15", config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # variance-preserving: q = to_q(x) keeps the scale of x
    assert 0.8 < float(a["0.to_q.weight"].float().std() * 320 ** 0.5) < 1.2


def test_sd15_lora_patches_the_expected_weights(fixtures, caplog):
    import comfy.model_management
    import nodes

    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(fixtures.checkpoint["sd15"])
    with caplog.at_level(logging.WARNING):
        model_lora, _ = nodes.LoraLoader().load_lora(model, clip, fixtures.lora_sd15, 1.0, 1.0)
    _no_load_warnings(caplog)
    targets = set(fixtures.lora_sd15_targets.values())
    assert len(targets) == len(fixture_models.LORA_BLOCKS) * len(fixture_models.LORA_LAYERS)
    assert set(model_lora.patches) == targets
    assert {k.split(".transformer_blocks.0.")[1].split(".")[0] for k in targets} == {"attn1", "attn2", "ff"}

    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    comfy.model_management.load_models_gpu([model_lora], force_patch_weights=True)
    try:
        after = model_lora.model.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed == targets
    finally:
        model_lora.unpatch_model()
        comfy.model_management.unload_all_models()


def test_sd15_controlnet_loads_every_weight(fixtures, caplog):
    import comfy.cldm.cldm
    import comfy.utils
    import nodes

    with caplog.at_level(logging.WARNING):
        (control,) = nodes.ControlNetLoader().load_controlnet(fixtures.controlnet_sd15)
    _no_load_warnings(caplog)
    net = control.control_model
    assert isinstance(net, comfy.cldm.cldm.ControlNet)
    stored = comfy.utils.load_torch_file(str(fixtures.path("controlnet", fixtures.controlnet_sd15)))
    loaded = net.state_dict()
    assert {"control_model." + k for k in loaded} == set(stored)
    assert all(torch.equal(loaded[k].float(), stored["control_model." + k].float()) for k in loaded)
    assert net.input_hint_block[0].in_channels == 3
    assert len(net.zero_convs) == len(net.input_blocks) == 4  # conv_in, level 1, downsample, level 2


@pytest.mark.parametrize("family", ["sd15", "sd21", pytest.param("sdxl", marks=sdxl)])
def test_reference_unet_matches_comfyui(host, family):
    comfy_unet = fixture_models.build_unet_model(family, torch.float32).diffusion_model
    ref = reference_unets.diffusers_unet_from_comfy(family, comfy_unet)
    inputs = reference_unets.unet_inputs(family, latent_hw=(8, 8) if family == "sdxl" else (4, 4))
    ours = reference_unets.run_comfy_unet(comfy_unet, inputs)
    theirs = reference_unets.run_diffusers_unet(ref, inputs)
    assert ours.shape == inputs["x"].shape
    assert torch.isfinite(ours).all()
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err < 1e-5, f"ComfyUI and diffusers UNets disagree by {err:.2e} (relative)"


def test_this_host_writes_the_shared_cache_files(host, fixtures, tmp_path):
    """Both test hosts read one fixture cache, filled by whichever ran first: this host's own
    comfy.sd.save_checkpoint must write the same checkpoint, key for key, dtype for dtype, bit for bit."""
    import comfy.utils

    cached = comfy.utils.load_torch_file(str(fixtures.path("checkpoint", fixtures.checkpoint["sd15"])))
    fresh_path = tmp_path / "sd15.safetensors"
    fixture_models.write_checkpoint("sd15", fresh_path)
    fresh = comfy.utils.load_torch_file(str(fresh_path))
    assert sorted(fresh) == sorted(cached)
    different = [k for k in fresh if fresh[k].dtype != cached[k].dtype or not torch.equal(fresh[k], cached[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_cache_reuses_files_and_regenerates_when_the_generator_changes(host, tmp_path, monkeypatch):
    models = fixture_models.FixtureModels(tmp_path)
    lora = models.path("lora", models.lora_sd15)
    first = lora.read_bytes()
    assert len(models.generation_log) == 1
    models.lora_sd15
    assert len(models.generation_log) == 1, "a fresh cached file was generated again"

    monkeypatch.setattr(fixture_models, "_source_key", lambda: "another-generator")
    models.lora_sd15
    assert len(models.generation_log) == 2, "a change of the generator source did not regenerate"
    assert lora.read_bytes() == first, "the same generator wrote different bytes"
    assert not [p for p in lora.parent.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    with pytest.raises(KeyError, match="only an SD 1.5"):
        models.name("lora", "sdxl")

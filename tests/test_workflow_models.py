"""Every model file an example workflow needs is named with a download link the frontend can offer.

The frontend (ComfyUI_frontend 1.32, `loadGraphData`) collects a node's `properties.models` entries only for
names among that node's widget values, plus the workflow's top-level `models`; its missing-models dialog then
accepts https://huggingface.co/ or https://civitai.com/ links to .safetensors/.sft files in a folder the server
knows. This test reads the workflows the same way. A user's own choice (an input image) needs no entry; the
LinFusion sets need none either, Load LinFusion downloads them (tests/test_hub_download.py).
"""
from __future__ import annotations

from urllib.parse import urlparse

import pytest

from workflow_shrink import WORKFLOWS, load

ALLOWED_SOURCES = ("https://huggingface.co/", "https://civitai.com/")
# (node type, widget) -> ComfyUI model folder of the file it names; None: the user's own file.
FILE_WIDGETS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("LoraLoader", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("IPAdapterModelLoader", "ipadapter_file"): "ipadapter",     # ComfyUI_IPAdapter_plus
}
# ComfyUI_IPAdapter_plus's unified loader finds its files by name (its README's list).
IPADAPTER_PRESET_FILES = {
    "PLUS (high strength)": [("ipadapter", "ip-adapter-plus_sd15.safetensors"),
                             ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")],
}
# Folders third-party packs and this extension register (absent from a bare host's folder_paths).
EXTRA_FOLDERS = {"ipadapter", "linfusion"}


def needed_files(wf: dict, object_info: dict, core) -> list[tuple[str, str]]:
    from workflow_convert import workflow_to_api

    needs = []
    for node in workflow_to_api(wf, object_info).values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LinFusionLoader":
            name = inputs["linfusion_name"]
            assert core.weights.hub_download.release_name(name), f"{name} is not a released set Load LinFusion downloads"
        elif kind == "IPAdapterUnifiedLoader":   # names no file: finds them by name (the pack's README)
            needs += IPADAPTER_PRESET_FILES[inputs["preset"]]
        elif "Loader" in kind:
            widgets = [key for key in FILE_WIDGETS if key[0] == kind]
            assert widgets, f"{kind}: a loader this test does not know; add it to FILE_WIDGETS"
            needs += [(FILE_WIDGETS[key], inputs[key[1]]) for key in widgets if FILE_WIDGETS[key] is not None]
    return needs


def offered_entries(wf: dict) -> list[dict]:
    """What the frontend collects, as loadGraphData does."""
    entries = list(wf.get("models") or [])
    for node in wf["nodes"]:
        shown = {v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.strip()}
        entries += [m for m in node.get("properties", {}).get("models") or [] if m["name"] in shown]
    return entries


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_needed_model_has_a_download_entry(host, core, name):
    import folder_paths
    from third_party_packs import IPADAPTER, require_pack
    from workflow_convert import live_object_info

    wf = load(name)
    require_pack(IPADAPTER)     # workflow 5's nodes, as the pack defines them
    object_info = live_object_info()
    entries = {(m["directory"], m["name"]): m for m in offered_entries(wf)}
    needs = needed_files(wf, object_info, core)
    for directory, file_name in needs:
        entry = entries.get((directory, file_name))
        assert entry, f"{name}: no `models` entry the frontend would read for {directory}/{file_name}"
        url = urlparse(entry["url"])
        assert url.scheme == "https" and entry["url"].startswith(ALLOWED_SOURCES), entry
        assert url.path.endswith((".safetensors", ".sft")) and file_name.endswith((".safetensors", ".sft")), entry
        assert directory in folder_paths.folder_names_and_paths or directory in EXTRA_FOLDERS, entry
    assert set(entries) <= set(needs), f"{name}: entries for files the workflow does not use: {set(entries) - set(needs)}"


def test_workflow_5_names_the_ipadapter_files():
    """The PLUS preset's two files (ComfyUI_IPAdapter_plus README: h94/IP-Adapter)."""
    entries = {m["name"]: m for m in offered_entries(load("linfusion_5_ipadapter.json"))}
    assert entries["ip-adapter-plus_sd15.safetensors"]["url"].startswith(
        "https://huggingface.co/h94/IP-Adapter/resolve/main/models/ip-adapter-plus_sd15.safetensors")
    assert entries["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]["url"].startswith(
        "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors")
    assert entries["ip-adapter-plus_sd15.safetensors"]["directory"] == "ipadapter"
    assert entries["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]["directory"] == "clip_vision"

"""Every list widget value a shipped workflow holds is in that widget's list, on a real ComfyUI server where
the files the workflows name exist (empty files of those names; the lists only read names): so no dropdown
shows a value missing from its own list once the user has the models the missing-models dialog offers. The
LinFusion sets are not put on disk: Load LinFusion lists the released sets before they are downloaded.
Workflow 5's IP-Adapter nodes are checked against the pack's declared lists (the pack is not installed here).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from comfy_browser import comfy_ui_server
from comfy_server import get_json
from third_party_packs import IPADAPTER, WORKFLOW_5_PACK_NODES, unpack
from workflow_build import combo_options
from workflow_convert import VIRTUAL_TYPES, input_specs, widget_slots
from workflow_shrink import WORKFLOWS, load

pytestmark = pytest.mark.slow


def named_files(workflows) -> set[tuple[str, str]]:
    """(model folder, file name) of every file the workflows name in their download entries."""
    files = set()
    for wf in workflows:
        entries = list(wf.get("models") or [])
        for node in wf["nodes"]:
            entries += node.get("properties", {}).get("models") or []
        files |= {(m["directory"], m["name"]) for m in entries}
    return files


@pytest.fixture(scope="module")
def object_info():
    comfy = Path(os.environ["COMFYUI_PATH"])
    models = Path(tempfile.mkdtemp(prefix="linfusion-named-models-"))
    try:
        for directory, name in named_files(load(n) for n in WORKFLOWS):
            (models / directory).mkdir(parents=True, exist_ok=True)
            (models / directory / name).write_bytes(b"")
        # Workflow 5's IP-Adapter nodes come from the real pack, so their lists are the pack's own.
        packs = (unpack(IPADAPTER, models / "packs"),)
        with comfy_ui_server(comfy, models, models, custom_nodes=packs) as (url, base):
            # The input image the workflows name is the one ComfyUI ships in its own input/ folder.
            shutil.copy(comfy / "input" / "example.png", base / "input" / "example.png")
            info = get_json(url + "/object_info")
            assert all(t in info for t in WORKFLOW_5_PACK_NODES), "the IP-Adapter pack did not load"
            yield info
    finally:
        shutil.rmtree(models, ignore_errors=True)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_list_value_is_in_its_list(name, object_info):
    checked = 0
    for node in load(name)["nodes"]:
        if node["type"] in VIRTUAL_TYPES:
            continue
        info = object_info[node["type"]]
        kinds = {n: t for n, t, _ in input_specs(info)}
        for slot, value in zip(widget_slots(info), node["widgets_values"]):
            if slot.to_api and kinds[slot.name] == "COMBO":
                assert value in combo_options(info, slot.name), (node["id"], node["type"], slot.name, value)
                checked += 1
    assert checked, "no list widget checked"

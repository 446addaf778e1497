"""The example workflows: current with the nodes, well formed, and running end to end on the fixtures.

Every file in example_workflows/ is converted to an API prompt with the live node definitions (as the
frontend would) and validated by ComfyUI. The end-to-end runs shrink the graphs with a test-only override
(`shrink`: small latents, few steps, small tiles, fixture model names) and run them through the real
executor; workflow 5 runs with the real ComfyUI_IPAdapter_plus (tests/third_party_packs.py) and its PLUS files made
with random weights in the pack's formats.
A run also checks that the engine behind each patch node in its graph ran (the tiled UNet on more than one
tile, the DemoFusion wrapper), not only that an image came out.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import MODEL_ROOT
from third_party_packs import (IPADAPTER, PackCalls, ipadapter_patch_calls, ipadapter_with_models, python_module,
                               require_pack)
from workflow_build import NODE_TITLE_H
from workflow_convert import NOTE_TYPES, live_object_info, workflow_to_api
from workflow_shrink import NEEDS_THIRD_PARTY, WORKFLOW_DIR, WORKFLOWS, expected_size, load, shrink

REPO = Path(__file__).resolve().parent.parent
OUR_MODULE = "ComfyUI-LinFusion"
# Inputs whose values name files a user downloads; validation may only miss these on the test host.
FILE_INPUTS = {"ckpt_name", "linfusion_name", "control_net_name", "lora_name", "image", "clip_name", "ipadapter_file"}


def _load_example_workflows_script():
    spec = importlib.util.spec_from_file_location("example_workflows", REPO / "scripts" / "example_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def object_info(host):
    require_pack(IPADAPTER)     # workflow 5's nodes, as the pack defines them
    return live_object_info()


def definitions(name, object_info):
    return object_info


def validate(prompt):
    import execution

    return asyncio.run(execution.validate_prompt("workflow-test", prompt, None))


def host_neutral(workflow: dict, object_info) -> dict:
    """The workflow less the unlinked outputs of output nodes: ComfyUI 0.33's SaveImage and PreviewImage
    gained an `images` output that 0.3.75's lack, so the file written on either host is current on both."""
    out = json.loads(json.dumps(workflow))
    for node in out["nodes"]:
        if object_info.get(node["type"], {}).get("output_node"):
            node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return out


def test_every_recipe_is_written_and_current(object_info):
    """The files are what scripts/example_workflows.py makes from today's node definitions (on either host:
    see host_neutral), written as that script writes them."""
    script = _load_example_workflows_script()
    version = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    built = script.build(object_info, version)
    for name, wf in built.items():
        if isinstance(wf, Exception):
            assert name not in WORKFLOWS, f"{name} is committed but can no longer be built: {wf}"
            continue
        assert name in WORKFLOWS, f"{name} is not written: run scripts/example_workflows.py"
        text = (WORKFLOW_DIR / name).read_text()
        committed = json.loads(text)
        assert text == script.dumps(committed), f"{name} is not formatted as scripts/example_workflows.py writes"
        assert host_neutral(committed, object_info) == host_neutral(wf, object_info), \
            f"{name} is stale: run `python3 scripts/comfy_host.py python scripts/example_workflows.py`"
    assert set(WORKFLOWS) <= set(built)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_structure(name, object_info):
    wf = load(name)
    defs = definitions(name, object_info)
    prompt = workflow_to_api(wf, defs)
    for node_id, node in prompt.items():
        module = defs[node["class_type"]].get("python_module", "")
        core = module == "nodes" or module.startswith("comfy_extras.")
        assert core or OUR_MODULE in module or (name in NEEDS_THIRD_PARTY and module == python_module(IPADAPTER)), \
            f"{name}: node {node_id} {node['class_type']} comes from {module!r}"
    assert any(OUR_MODULE in defs[n["class_type"]].get("python_module", "") for n in prompt.values())
    assert any(defs[n["class_type"]].get("output_node") for n in prompt.values()), f"{name} saves nothing"

    # Grouped and titled: every node sits inside a titled group; a note explains the models.
    groups = wf["groups"]
    assert groups and all(g["title"] for g in groups)
    for node in wf["nodes"]:
        x, y = node["pos"][0], node["pos"][1] - NODE_TITLE_H
        inside = [g for g in groups if g["bounding"][0] <= x and g["bounding"][1] <= y
                  and x + node["size"][0] <= g["bounding"][0] + g["bounding"][2]
                  and node["pos"][1] + node["size"][1] <= g["bounding"][1] + g["bounding"][3]]
        assert inside, f"{name}: node {node['id']} {node['type']} is outside every group"
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in NOTE_TYPES)
    assert "models/linfusion/" in notes

    ok, error, _, node_errors = validate(prompt)
    assert error is None or error.get("type") == "prompt_outputs_failed_validation", error
    for node_id, errs in node_errors.items():
        for e in errs["errors"]:
            # Only the files a user downloads may be absent here (the host has fixtures, not hub files).
            assert e["type"] in ("value_not_in_list", "custom_validation_failed"), (name, node_id, e)
            assert e["extra_info"]["input_name"] in FILE_INPUTS, (name, node_id, e)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- end to end on the fixtures


def capture_saved_images(prompt: dict) -> str:
    save = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert len(save) == 1
    prompt["capture"] = {"class_type": "LinFusionTest_Capture", "inputs": {"value": prompt[save[0]]["inputs"]["images"]}}
    return "capture"


@pytest.fixture(scope="module")
def input_image(host):
    """A small test image in ComfyUI's input folder (LoadImage reads from there)."""
    import folder_paths
    from PIL import Image

    name = "linfusion_workflow_test.png"
    grid = torch.linspace(0, 255, 48)
    pixels = torch.stack([grid[None, :].expand(48, 48), grid[:, None].expand(48, 48),
                          torch.full((48, 48), 128.0)], -1)
    path = Path(folder_paths.get_input_directory()) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
    yield name, (48, 48)
    path.unlink(missing_ok=True)


class LinFusionCalls:
    """Counts forward calls of LinFusion's attention modules (whatever model they are installed in)."""

    def __init__(self, core):
        self.cls = core.attention.module.LinFusionAttention
        self.count = 0

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.cls):
                self.count += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def first_tensor_shape(*args, **kwargs) -> tuple:
    """The shape of a call's first tensor argument (the latent)."""
    return next(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))


def engine_spies(core, prompt):
    """For the patch nodes in `prompt`: node type -> a spy on the engine code that node installs."""
    targets = {"LinFusionTiledUNet": (core.tiling.tiled_unet.TiledUNetRunner, "forward"),
               "LinFusionDemoFusion": (core.highres.demofusion.DemoFusionWrapper, "__call__")}
    kinds = {n["class_type"] for n in prompt.values()}
    return {kind: PackCalls(*target, first_tensor_shape) for kind, target in targets.items() if kind in kinds}


RUNNABLE = [n for n in WORKFLOWS]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_on_fixtures(name, host, core, fixtures, object_info, input_image):
    ipadapter = ipadapter_with_models(fixtures, MODEL_ROOT) if name in NEEDS_THIRD_PARTY else None
    defs = definitions(name, object_info)
    prompt = shrink(workflow_to_api(load(name), defs), fixtures, input_image[0])
    capture = capture_saved_images(prompt)
    spies = engine_spies(core, prompt)
    host.reset_cache()
    with ipadapter_patch_calls(ipadapter) if ipadapter else _nothing() as ipadapter_calls, \
            LinFusionCalls(core) as calls, contextlib.ExitStack() as stack:
        for spy in spies.values():
            stack.enter_context(spy)
        result = host.run(prompt)
    image = result.captured[capture]
    w, h = expected_size(prompt, input_image[1])
    assert tuple(image.shape) == (1, h, w, 3), (name, tuple(image.shape))
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0, f"{name}: a flat image"
    assert calls.count > 0, f"{name}: LinFusion's attention never ran"
    for kind, spy in spies.items():
        assert spy.calls, f"{name}: {kind} is in the graph but its engine never ran"
    if "LinFusionTiledUNet" in spies:
        tile = next(n["inputs"]["tile_size"] for n in prompt.values() if n["class_type"] == "LinFusionTiledUNet")
        assert max(max(s[-2:]) for s in spies["LinFusionTiledUNet"].calls) > tile, \
            f"{name}: the tiled UNet never saw a latent larger than one tile"
    if ipadapter_calls is not None:
        blocks = {c[0] for c in ipadapter_calls.calls}
        assert ("input", 1) in blocks and ("output", 3) in blocks, f"{name}: the IP-Adapter patch ran at {blocks}"

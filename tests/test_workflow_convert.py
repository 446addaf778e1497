"""The UI -> API workflow converter, held to the frontend's own files and to hand-made edge cases."""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest

from workflow_build import UIGraph
from workflow_convert import WorkflowError, input_specs, live_object_info, widget_slots, workflow_to_api

@pytest.fixture(scope="module")
def object_info(host):
    return live_object_info()


def validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt("convert-test", prompt, None))


def shipped_templates(object_info) -> list[Path]:
    """Workflows the ComfyUI frontend saved, as this ComfyUI serves them under /templates/ (its own list of
    template files, wherever the installed template packages keep them), that use only nodes this host has."""
    from app.frontend_management import FrontendManager

    found = []
    for name, path in sorted((FrontendManager.template_asset_map() or {}).items()):
        if not name.endswith(".json"):
            continue
        wf = json.loads(Path(path).read_text())
        if not isinstance(wf, dict) or "nodes" not in wf or wf.get("definitions", {}).get("subgraphs"):
            continue
        virtual = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
        if all(n["type"] in virtual or (n["type"] in object_info and not dynamic_inputs(object_info[n["type"]]))
               for n in wf["nodes"]):
            found.append(Path(path))
    return found


def dynamic_inputs(info) -> bool:
    """Inputs of the V3 schema's dynamic kinds, which the converter does not handle (its docstring says so)."""
    return any(str(kind).startswith("COMFY_") and str(kind).endswith("_V3") for _, kind, _ in input_specs(info))


def test_shipped_templates_convert_to_prompts_the_server_accepts(object_info):
    """Every frontend-saved template converts, and the server's validation objects only to model and
    image files this test host does not have (a wrong widget order would give type or range errors).
    A template saved with an older version of a node than its ComfyUI has (fewer widget values than the node
    now takes: ComfyUI 0.33 ships a few) is refused by the converter with a message that says so, which is
    the converter's job; those are counted, and must stay a small minority."""
    templates = shipped_templates(object_info)
    checked_reroute = checked_primitive = 0
    stale = []
    for path in templates:
        wf = json.loads(path.read_text())
        try:
            prompt = workflow_to_api(wf, object_info, strict=False)
        except WorkflowError as e:
            assert "the file does not match this version of the node" in str(e), f"{path.name}: {e}"
            stale.append(path.name)
            continue
        types = {n["type"] for n in wf["nodes"]}
        checked_reroute += "Reroute" in types
        checked_primitive += "PrimitiveNode" in types
        ok, _, _, node_errors = validate(prompt)
        for node_id, errs in node_errors.items():
            for e in errs["errors"]:
                missing_file = e["type"] == "value_not_in_list" or (
                    e["type"] == "custom_validation_failed" and " - Invalid " in e["details"])  # image, video
                assert missing_file, f"{path.name}: node {node_id} {prompt[node_id]['class_type']}: {e}"
    print(f"{len(templates) - len(stale)} templates converted; stale against this ComfyUI's nodes: {stale}")
    assert len(templates) - len(stale) >= 20, "too few shipped templates found to check the converter against"
    assert len(stale) * 10 <= len(templates), f"{len(stale)} of {len(templates)} templates refused: {stale}"
    assert checked_reroute and checked_primitive


def txt2img(object_info) -> dict:
    g = UIGraph(object_info)
    with g.group("Models", 0):
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name="model.safetensors")
        lora = g.node("LoraLoader", model=ckpt["MODEL"], clip=ckpt["CLIP"], lora_name="style.safetensors")
        g.note("pick a model")
    with g.group("Sample", 1):
        pos = g.node("CLIPTextEncode", text="a cat", clip=lora["CLIP"])
        neg = g.node("CLIPTextEncode", text="", clip=lora["CLIP"])
        latent = g.node("EmptyLatentImage", width=640, height=384)
        sampler = g.node("KSampler", model=lora["MODEL"], positive=pos[0], negative=neg[0],
                         latent_image=latent[0], seed=7, steps=12, cfg=6.5, sampler_name="euler",
                         scheduler="normal")
        g.node("SaveImage", images=g.node("VAEDecode", samples=sampler[0], vae=ckpt["VAE"])[0])
    return g.to_json()


def by_type(wf, kind):
    return [n for n in wf["nodes"] if n["type"] == kind]


def add_link(wf, origin, origin_slot, target, target_slot, kind):
    link_id = max(l[0] for l in wf["links"]) + 1
    wf["links"].append([link_id, origin["id"], origin_slot, target["id"], target_slot, kind])
    return link_id


def add_node(wf, kind, **fields):
    node = {"id": max(n["id"] for n in wf["nodes"]) + 1, "type": kind, "pos": [0, 0], "size": [100, 30],
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}, **fields}
    wf["nodes"].append(node)
    return node


def test_plain_graph_gives_the_expected_prompt(object_info):
    wf = txt2img(object_info)
    prompt = workflow_to_api(wf, object_info)
    ids = {n["type"]: str(n["id"]) for n in wf["nodes"]}
    sampler = prompt[ids["KSampler"]]
    # control_after_generate sits in widgets_values after the seed, and never reaches the prompt.
    node = by_type(wf, "KSampler")[0]
    assert node["widgets_values"][:2] == [7, "fixed"]
    assert sampler["inputs"] == {"seed": 7, "steps": 12, "cfg": 6.5, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": 1.0, "model": [ids["LoraLoader"], 0], "positive": [sampler["inputs"]["positive"][0], 0],
                                 "negative": [sampler["inputs"]["negative"][0], 0], "latent_image": [ids["EmptyLatentImage"], 0]}
    assert "MarkdownNote" not in {p["class_type"] for p in prompt.values()}
    assert prompt[ids["EmptyLatentImage"]]["inputs"] == {"width": 640, "height": 384, "batch_size": 1}
    assert validate(prompt)[3].keys() <= {ids["CheckpointLoaderSimple"], ids["LoraLoader"]}  # model files only


def test_reroute_primitive_converted_widget_bypass_and_mute(object_info):
    wf = txt2img(object_info)
    ckpt, lora, sampler = by_type(wf, "CheckpointLoaderSimple")[0], by_type(wf, "LoraLoader")[0], by_type(wf, "KSampler")[0]
    latent = by_type(wf, "EmptyLatentImage")[0]
    # A reroute on the VAE link.
    decode = by_type(wf, "VAEDecode")[0]
    vae_link = decode["inputs"][1]["link"]
    reroute = add_node(wf, "Reroute", inputs=[{"name": "", "type": "*", "link": vae_link}],
                       outputs=[{"name": "", "type": "VAE", "links": []}])
    wf["links"] = [l for l in wf["links"] if l[0] != vae_link] + [[vae_link, ckpt["id"], 2, reroute["id"], 0, "VAE"]]
    decode["inputs"][1]["link"] = add_link(wf, reroute, 0, decode, 1, "VAE")
    # steps driven by a primitive (the widget turned into an input): the value stays in widgets_values.
    prim = add_node(wf, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [],
                                                  "widget": {"name": "steps"}}], widgets_values=[12, "fixed"])
    sampler["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None})
    sampler["inputs"][-1]["link"] = add_link(wf, prim, 0, sampler, len(sampler["inputs"]) - 1, "INT")
    # width converted to an input fed by a real node: the link wins over the stored widget value.
    size = add_node(wf, "PrimitiveInt", outputs=[{"name": "INT", "type": "INT", "links": []}],
                    widgets_values=[256, "fixed"]) if "PrimitiveInt" in object_info else None
    if size is not None:
        assert [s.name for s in widget_slots(object_info["PrimitiveInt"])] == ["value", "control_after_generate"]
        latent["inputs"].append({"name": "width", "type": "INT", "widget": {"name": "width"}, "link": None})
        latent["inputs"][-1]["link"] = add_link(wf, size, 0, latent, len(latent["inputs"]) - 1, "INT")
    # The LoRA bypassed: MODEL and CLIP pass straight from the checkpoint.
    lora["mode"] = 4
    # A muted dangling node is left out.
    muted = add_node(wf, "EmptyLatentImage", mode=2, widgets_values=[64, 64, 1])

    prompt = workflow_to_api(wf, object_info)
    assert str(lora["id"]) not in prompt and str(muted["id"]) not in prompt
    assert {p["class_type"] for p in prompt.values()} >= {"KSampler", "VAEDecode"}
    assert "Reroute" not in {p["class_type"] for p in prompt.values()}
    assert prompt[str(decode["id"])]["inputs"]["vae"] == [str(ckpt["id"]), 2]
    assert prompt[str(sampler["id"])]["inputs"]["model"] == [str(ckpt["id"]), 0]
    assert prompt[str(sampler["id"])]["inputs"]["steps"] == 12
    for enc in by_type(wf, "CLIPTextEncode"):
        assert prompt[str(enc["id"])]["inputs"]["clip"] == [str(ckpt["id"]), 1]
    if size is not None:
        assert prompt[str(latent["id"])]["inputs"]["width"] == [str(size["id"]), 0]
    assert validate(prompt)[3].keys() <= {str(ckpt["id"])}


def test_unknown_node_type_fails_loudly(object_info):
    wf = txt2img(object_info)
    # A pack node no host ships (a real pack's name could be registered by the pack tests of this session).
    add_node(wf, "SomePackNotInstalled", widgets_values=[1.0])
    with pytest.raises(WorkflowError, match="'SomePackNotInstalled' is neither a ComfyUI core node"):
        workflow_to_api(wf, object_info)
    declared = {**object_info, "SomePackNotInstalled": {"input": {"required": {"weight": ("FLOAT", {})}}, "output": []}}
    assert workflow_to_api(wf, declared)


def test_widget_values_that_do_not_fit_the_node_fail(object_info):
    wf = txt2img(object_info)
    sampler = by_type(wf, "KSampler")[0]
    broken = copy.deepcopy(wf)
    by_type(broken, "KSampler")[0]["widgets_values"].remove("fixed")  # saved without the seed control
    with pytest.raises(WorkflowError, match=r"widgets_values has 6 entries but KSampler has 7"):
        workflow_to_api(broken, object_info)
    wrong_type = copy.deepcopy(wf)
    by_type(wrong_type, "KSampler")[0]["widgets_values"][2] = "20"
    with pytest.raises(WorkflowError, match=r"'steps' holds '20', not a INT"):
        workflow_to_api(wrong_type, object_info)
    with pytest.raises(WorkflowError, match="not a UI-format workflow"):
        workflow_to_api({str(sampler["id"]): {"class_type": "KSampler", "inputs": {}}}, object_info)

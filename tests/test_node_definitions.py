"""What a user's frontend is told about the extension's nodes, read from the host's own HTTP API.

The nodes are declared in ComfyUI's V1 form (INPUT_TYPES, RETURN_TYPES, ...), which both supported hosts load
(docs/node_schema.md says why they do not move to the V3 schema). Each host serves them at /object_info,
where the frontend reads inputs, tooltips, categories and names: on every host the entry must carry exactly
what the class declares, so users of 0.3.75 and of 0.33 see the same nodes.
"""
from __future__ import annotations

import json

import pytest

# The twelve nodes the README lists.
OUR_NODES = {"LinFusionLoader", "ApplyLinFusion", "CheckpointLoaderLinFusion", "LinFusionControlNet",
             "LinFusionProgressiveUpscale", "LinFusionDemoFusion", "LinFusionSkipResidualSampler",
             "LinFusionMatchLatentStats", "LinFusionLowMemory", "LinFusionVAEDecodeTiled",
             "LinFusionVAEEncodeTiled", "LinFusionTiledUNet"}


@pytest.fixture(scope="module")
def served(host):
    return host.get_json("/object_info")


@pytest.fixture(scope="module")
def ours(host):
    return host.extension_module.NODE_CLASS_MAPPINGS, host.extension_module.NODE_DISPLAY_NAME_MAPPINGS


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


def test_the_twelve_nodes_are_served(served, ours):
    classes, _ = ours
    assert OUR_NODES <= set(classes)
    assert not [node for node in classes if node not in served], "a registered node is missing from /object_info"


def test_served_definitions_are_the_declared_ones(served, ours):
    classes, names = ours
    for node, cls in classes.items():
        check_served(node, cls, names, served[node])


def check_served(node, cls, names, info):
    declared = cls.INPUT_TYPES()
    assert info["category"] == cls.CATEGORY
    assert info["name"] == node
    assert info["display_name"] == names.get(node, node)
    assert info["description"] == getattr(cls, "DESCRIPTION", "")
    assert info["output"] == list(cls.RETURN_TYPES)
    assert info["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert info["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS)
    for section in ("required", "optional"):
        declared_inputs = declared.get(section, {})
        served_inputs = info["input"].get(section, {})
        assert list(served_inputs) == list(declared_inputs), f"{node}: {section} inputs differ"
        for name, spec in declared_inputs.items():
            assert served_inputs[name] == jsonable(list(spec)), f"{node}.{name} is served differently"

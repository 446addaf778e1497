"""Convert a ComfyUI UI-format workflow (the graph the frontend saves) to the API format, without a browser.

The frontend builds the API prompt (`app.graphToPrompt`) from its widgets, and it builds the widgets
from the server's node definitions (`/object_info`). This module does the same from the same
definitions, so a workflow file can be checked and run in a test:
- widgets are the inputs whose type is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO, ...) and that
  are not `forceInput`, in the order of the required then optional inputs; `widgets_values` holds one
  entry per widget, plus the frontend-only entries it adds: `control_after_generate` after a seed
  (`seed`/`noise_seed` INT, or any input asking for it), `control_filter_list` after a controlled COMBO,
  `upload` after an image/video/audio upload COMBO. Those extra entries never reach the API prompt.
- a widget turned into an input socket and linked takes its value from the link instead.
- frontend-only nodes (Reroute, Note, MarkdownNote, PrimitiveNode) are resolved through or dropped;
  muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass the input of the same type through.
Anything the frontend would show as a missing node, or a `widgets_values` that does not fit the node's
definition, raises WorkflowError naming the node: these are the errors a user would hit.
Not handled: subgraphs, and the V3 schema's dynamic inputs (`COMFY_AUTOGROW_V3` groups such as
ComfyMathExpression's `values.a`, `COMFY_DYNAMICCOMBO_V3` choices that bring their own widgets), which
ComfyUI 0.33's core nodes started to use; this project's workflows use neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Input types the frontend draws as widgets (its ComfyWidgets registry); every other type is a socket.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR",
                          "IMAGEUPLOAD", "IMAGECOMPARE", "CHART"})
# COMBO options that make the frontend add an upload button widget (serialised in widgets_values).
UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")
SEED_NAMES = ("seed", "noise_seed")
# Nodes that exist only in the frontend.
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE}) | NOTE_TYPES
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    """The workflow would not load or queue in ComfyUI as it is."""


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's widgets_values."""
    name: str
    to_api: bool        # False for the frontend's own control/upload widgets


def live_object_info(class_types: Iterable[str] | None = None) -> dict[str, dict]:
    """The node definitions the running ComfyUI serves at /object_info (call after the host booted)."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    out = {}
    for name in class_types if class_types is not None else nodes.NODE_CLASS_MAPPINGS:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        if issubclass(cls, _ComfyNodeInternal):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        out[name] = {
            "input": inputs,
            "input_order": {k: list(v.keys()) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return out


def input_specs(info: Mapping) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of the required then optional inputs, in the definition's order."""
    specs = []
    for section in ("required", "optional"):
        section_inputs = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(section_inputs))
        for name in order:
            spec = section_inputs[name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, (list, tuple)) else kind, opts))
    return specs


def is_widget(kind: str, opts: Mapping) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput", False)


def widget_slots(info: Mapping) -> list[WidgetSlot]:
    """The entries of widgets_values the frontend writes for a node with this definition."""
    slots = []
    for name, kind, opts in input_specs(info):
        if not is_widget(kind, opts):
            continue
        slots.append(WidgetSlot(name, True))
        control = opts.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in SEED_NAMES):
            slots.append(WidgetSlot("control_after_generate", False))
        elif kind == "COMBO" and control:
            slots += [WidgetSlot("control_after_generate", False), WidgetSlot("control_filter_list", False)]
        if kind == "COMBO" and any(opts.get(o) for o in UPLOAD_OPTIONS):
            slots.append(WidgetSlot("upload", False))
    return slots


def _where(node: Mapping) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


class _Graph:
    def __init__(self, workflow: Mapping):
        if not isinstance(workflow, Mapping) or "nodes" not in workflow or "links" not in workflow:
            raise WorkflowError("not a UI-format workflow: expected an object with 'nodes' and 'links' "
                                "(an API-format prompt has node ids as its keys instead)")
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("the workflow holds subgraphs, which this converter does not expand")
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow["links"]:
            if isinstance(link, Mapping):  # the 0.4 schema allows link objects as well as arrays
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                        link["target_slot"], link["type"]]
            self.links[link[0]] = link

    def source(self, link_id, wanted_type: str | None = None):
        """(node, slot) that really feeds a link, through reroutes and bypassed nodes; None when nothing does."""
        seen = set()
        while link_id is not None:
            if link_id in seen:
                raise WorkflowError(f"link {link_id} loops back through reroutes or bypassed nodes")
            seen.add(link_id)
            link = self.links.get(link_id)
            if link is None:
                raise WorkflowError(f"link {link_id} is used by a node but missing from 'links'")
            origin = self.nodes.get(link[1])
            if origin is None:
                raise WorkflowError(f"link {link_id} starts at node {link[1]}, which does not exist")
            if origin["type"] == REROUTE:
                link_id = origin["inputs"][0].get("link")
                continue
            if origin.get("mode", MODE_ALWAYS) == MODE_BYPASS:
                link_id = self._bypass_input(origin, link[2], wanted_type or link[5])
                continue
            if origin.get("mode", MODE_ALWAYS) == MODE_NEVER:
                return None
            return origin, link[2]
        return None

    @staticmethod
    def _bypass_input(node, out_slot: int, kind: str):
        # As the frontend does: the input at the same index if its type matches, else the first match.
        inputs = node.get("inputs") or []
        candidates = ([inputs[out_slot]] if out_slot < len(inputs) else []) + inputs
        for inp in candidates:
            if inp.get("type") == kind and inp.get("link") is not None:
                return inp["link"]
        return None


def workflow_to_api(workflow: Mapping, object_info: Mapping[str, Mapping], *, strict: bool = True) -> dict:
    """The API-format prompt the frontend would queue for `workflow`, given the server's node definitions.

    `object_info` maps every node type the workflow may use to its /object_info entry (see
    live_object_info); a node type missing from it is an error, as a missing node is for a user.
    strict=False accepts trailing widgets_values entries beyond the definition's: frontend extensions
    append display widgets to some core nodes (e.g. GetImageSize's size text), which files saved with
    them carry. It also accepts fewer entries, as the frontend loads a file saved before a node gained a
    widget (CreateVideo's bit_depth in ComfyUI 0.33): the missing trailing widgets keep their defaults.
    """
    graph = _Graph(workflow)
    prompt = {}
    for node in sorted(graph.nodes.values(), key=lambda n: n["id"]):
        kind = node.get("type")
        if kind in VIRTUAL_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"{_where(node)}: node type {kind!r} is neither a ComfyUI core node, a "
                                "LinFusion node nor a declared third-party node")
        prompt[str(node["id"])] = {
            "inputs": _node_inputs(graph, node, info, strict),
            "class_type": kind,
            "_meta": {"title": node.get("title") or info.get("display_name") or kind},
        }
    return prompt


def _node_inputs(graph: _Graph, node: Mapping, info: Mapping, strict: bool) -> dict:
    specs = {name: (kind, opts) for name, kind, opts in input_specs(info)}
    inputs = _widget_inputs(node, info, strict)
    for slot in node.get("inputs") or []:
        name = (slot.get("widget") or {}).get("name") or slot["name"]
        if name not in specs:
            raise WorkflowError(f"{_where(node)}: input {name!r} is not an input of {node['type']} "
                                f"(it has {sorted(specs)})")
        if slot.get("link") is None:
            continue
        src = graph.source(slot["link"], slot.get("type"))
        if src is None:
            continue  # fed by a muted node: the frontend sends the widget's own value, or nothing
        origin, out_slot = src
        if origin["type"] == PRIMITIVE:
            continue  # a primitive only drives the widget value, already in widgets_values
        inputs[name] = [str(origin["id"]), out_slot]
    return inputs


def _widget_inputs(node: Mapping, info: Mapping, strict: bool) -> dict:
    slots = widget_slots(info)
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, Mapping):  # some extensions save widgets by name
        return {s.name: values[s.name] for s in slots if s.to_api and s.name in values}
    if not strict and len(values) < len(slots):
        values = list(values) + [_default(node, info, slot) for slot in slots[len(values):]]
    if len(values) < len(slots) or (strict and len(values) != len(slots)):
        raise WorkflowError(
            f"{_where(node)}: widgets_values has {len(values)} entries but {node['type']} has "
            f"{len(slots)} widget entries {[s.name for s in slots]}: the file does not match this version "
            "of the node")
    specs = {name: (kind, opts) for name, kind, opts in input_specs(info)}
    out = {}
    for slot, value in zip(slots, values):
        if not slot.to_api:
            continue
        kind, opts = specs[slot.name]
        _check_value(node, slot.name, kind, opts, value)
        out[slot.name] = value
    return out


def _default(node: Mapping, info: Mapping, slot: WidgetSlot):
    """The value the frontend gives a widget the file has no entry for: the definition's default, else the
    first choice of a COMBO (the frontend's own control widgets are never sent)."""
    if not slot.to_api:
        return None
    kind, opts = {name: (kind, opts) for name, kind, opts in input_specs(info)}[slot.name]
    if "default" in opts:
        return opts["default"]
    choices = _combo_choices(info, slot.name)
    if kind == "COMBO" and choices:
        return choices[0]
    raise WorkflowError(f"{_where(node)}: widgets_values has no entry for {slot.name!r}, which has no default")


def _combo_choices(info: Mapping, name: str) -> list:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            kind = spec[0]
            if isinstance(kind, (list, tuple)):
                return list(kind)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return list(opts.get("options", []))
    return []


def _check_value(node, name, kind, opts, value) -> None:
    """The checks the frontend's widgets make before a value is sent (the server checks ranges)."""
    ok = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "BOOLEAN": lambda v: isinstance(v, bool),
          "STRING": lambda v: isinstance(v, str)}.get(kind, lambda v: True)
    if not ok(value):
        raise WorkflowError(f"{_where(node)}: widget {name!r} holds {value!r}, not a {kind}")
    if kind == "STRING" and opts.get("dynamicPrompts") and "{" in value:
        # The frontend expands {a|b} choices at queue time; a test could not predict the prompt.
        raise WorkflowError(f"{_where(node)}: widget {name!r} uses {{a|b}} dynamic prompt syntax")

"""Write UI-format workflows (what the ComfyUI frontend saves) from a few lines of Python.

Nodes get their sockets, widget entries and defaults from the server's node definitions (see
workflow_convert.live_object_info), so the widget order is the node's own and never typed by hand.
Layout: every group is a box of nodes stacked top to bottom; groups stack in columns, left to right.
"""
from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from workflow_convert import input_specs, is_widget, widget_slots

NODE_WIDTH = 330
TEXT_NODE_WIDTH = 420
GAP = 30
GROUP_PAD = 16
GROUP_TITLE_H = 44
NODE_TITLE_H = 30          # LiteGraph draws a node's title bar above its pos
IMAGE_PANEL_H = {"LoadImage": 260, "SaveImage": 300, "PreviewImage": 220}   # room for the image preview
COLUMN_GAP = 70
GROUP_COLOR = "#3f789e"
# Colours the frontend uses for positive / negative prompts and notes.
COLORS = {"positive": ("#232", "#353"), "negative": ("#322", "#533"), "note": ("#432", "#653")}
FRONTEND_VERSION = "1.32.9"
VIEW = (1600, 1000)


@dataclass(frozen=True)
class Out:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    type: str
    info: Mapping | None
    title: str | None
    values: dict
    links_in: dict = field(default_factory=dict)      # input name -> Out
    color: tuple | None = None
    width: int = NODE_WIDTH
    height: int = 0
    pos: tuple = (0, 0)
    properties: dict = field(default_factory=dict)

    def __getitem__(self, key) -> Out:
        if isinstance(key, int):
            return Out(self, key)
        names = self.info.get("output_name") or self.info["output"]
        if key not in names:
            raise KeyError(f"{self.type} has no output {key!r}; it has {names}")
        return Out(self, list(names).index(key))


class UIGraph:
    def __init__(self, object_info: Mapping[str, Mapping], node_properties=None):
        """node_properties(type, info) -> extra `properties` of a node (registry id, version)."""
        self.object_info = object_info
        self.node_properties = node_properties or (lambda kind, info: {})
        self.nodes: list[Node] = []
        self.groups: list[dict] = []   # {"title", "column", "nodes": [...]}
        self._group = None

    @contextlib.contextmanager
    def group(self, title: str, column: int):
        grp = {"title": title, "column": column, "nodes": []}
        self.groups.append(grp)
        self._group, prev = grp, self._group
        try:
            yield grp
        finally:
            self._group = prev

    def _add(self, node: Node) -> Node:
        if self._group is None:
            raise ValueError(f"{node.type}: every node of an example sits in a group")
        self.nodes.append(node)
        self._group["nodes"].append(node)
        return node

    def node(self, kind: str, title: str | None = None, color: str | None = None, models=None,
             **inputs: Any) -> Node:
        """A node of type `kind`; an `Out` value links an input, any other value sets a widget."""
        info = self.object_info.get(kind)
        if info is None:
            raise KeyError(f"node type {kind!r} is not defined on this host")
        specs = {name: (t, opts) for name, t, opts in input_specs(info)}
        unknown = set(inputs) - set(specs)
        if unknown:
            raise KeyError(f"{kind} has no inputs {sorted(unknown)}; it has {list(specs)}")
        node = Node(len(self.nodes) + 1, kind, info, title, {}, color=COLORS.get(color))
        for name, (t, opts) in specs.items():
            given = inputs.get(name)
            if isinstance(given, Out):
                node.links_in[name] = given
            elif name in inputs:
                node.values[name] = given
        node.properties = {"Node name for S&R": kind, **self.node_properties(kind, info)}
        if models:
            node.properties["models"] = models
        text_widgets = [n for n, (t, o) in specs.items() if t == "STRING" and o.get("multiline")]
        node.width = TEXT_NODE_WIDTH if text_widgets else NODE_WIDTH
        sockets = sum(1 for n, (t, o) in specs.items() if not is_widget(t, o))
        rows = max(sockets, len(info["output"])) + len(widget_slots(info))
        node.height = 46 + 24 * rows + 110 * len(text_widgets) + IMAGE_PANEL_H.get(kind, 0)
        return self._add(node)

    def note(self, text: str, title: str = "Note", width: int = NODE_WIDTH, height: int = 160) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", None, title, {"text": text}, color=COLORS["note"],
                    width=width, height=height)
        return self._add(node)

    def to_json(self) -> dict:
        self._layout()
        links, nodes_json = [], []
        outputs_links: dict[tuple, list] = {}
        inputs_json: dict[int, list] = {}
        for node in self.nodes:
            ins = []
            if node.info is not None:
                for name, t, opts in input_specs(node.info):
                    linked = node.links_in.get(name)
                    if is_widget(t, opts) and linked is None:
                        continue
                    entry = {"name": name, "type": t, "link": None}
                    if is_widget(t, opts):
                        entry["widget"] = {"name": name}
                    if name in node.info["input"].get("optional", {}):
                        entry["shape"] = 7  # the frontend draws optional sockets hollow
                    if linked is not None:
                        link_id = len(links) + 1
                        out_type = linked.node.info["output"][linked.slot]
                        links.append([link_id, linked.node.id, linked.slot, node.id, len(ins), out_type])
                        outputs_links.setdefault((linked.node.id, linked.slot), []).append(link_id)
                        entry["link"] = link_id
                    ins.append(entry)
            inputs_json[node.id] = ins
        order = self._topological_order()
        for node in self.nodes:
            out = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": [node.width, node.height],
                   "flags": {}, "order": order[node.id], "mode": 0, "inputs": inputs_json[node.id],
                   "outputs": self._outputs_json(node, outputs_links)}
            if node.title:
                out["title"] = node.title
            out["properties"] = dict(node.properties)
            out["widgets_values"] = self._widgets_values(node)
            if node.color:
                out["color"], out["bgcolor"] = node.color
            nodes_json.append(out)
        left = min(g["bounding"][0] for g in self.groups)
        top = min(g["bounding"][1] for g in self.groups)
        right = max(g["bounding"][0] + g["bounding"][2] for g in self.groups)
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in self.groups)
        # Open the view on the whole graph in a 1600x1000 window (side bar and top bars left free).
        scale = round(min(1.0, (VIEW[0] - 140) / (right - left), (VIEW[1] - 170) / (bottom - top)), 3)
        offset = [round(110 / scale - left), round(120 / scale - top)]
        groups_json = [{"id": i + 1, "title": g["title"], "bounding": g["bounding"], "color": GROUP_COLOR,
                        "font_size": 24, "flags": {}} for i, g in enumerate(self.groups)]
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "linfusion:" + ",".join(n.type for n in self.nodes))),
                "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(links),
                "nodes": nodes_json, "links": links, "groups": groups_json, "config": {},
                "extra": {"ds": {"scale": scale, "offset": offset}, "frontendVersion": FRONTEND_VERSION},
                "version": 0.4}

    @staticmethod
    def _outputs_json(node: Node, outputs_links) -> list:
        if node.info is None:
            return []
        names = node.info.get("output_name") or node.info["output"]
        return [{"name": name, "type": t, "slot_index": i, "links": outputs_links.get((node.id, i)) or None}
                for i, (name, t) in enumerate(zip(names, node.info["output"]))]

    @staticmethod
    def _widgets_values(node: Node) -> list:
        if node.info is None:
            return [node.values["text"]]
        specs = {name: (t, opts) for name, t, opts in input_specs(node.info)}
        values = []
        for slot in widget_slots(node.info):
            if not slot.to_api:
                values.append({"control_after_generate": "fixed", "control_filter_list": "",
                               "upload": "image"}[slot.name])
                continue
            t, opts = specs[slot.name]
            values.append(node.values[slot.name] if slot.name in node.values else _default(slot.name, t, opts, node))
        return values

    def _topological_order(self) -> dict[int, int]:
        order, done = {}, set()

        def visit(node):
            if node.id in done:
                return
            done.add(node.id)
            for out in node.links_in.values():
                visit(out.node)
            order[node.id] = len(order)

        for node in self.nodes:
            visit(node)
        return order

    def _layout(self) -> None:
        columns: dict[int, list] = {}
        for g in self.groups:
            columns.setdefault(g["column"], []).append(g)
        x = 0
        for col in sorted(columns):
            width = max(max(n.width for n in g["nodes"]) for g in columns[col]) + 2 * GROUP_PAD
            y = 0
            for g in columns[col]:
                ny = y + GROUP_TITLE_H
                for n in g["nodes"]:
                    n.pos = (x + GROUP_PAD, ny + NODE_TITLE_H)
                    ny += NODE_TITLE_H + n.height + GAP
                g["bounding"] = [x, y, width, ny - y - GAP + GROUP_PAD]
                y = ny + GAP
            x += width + COLUMN_GAP


def combo_options(info: Mapping, name: str) -> list:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            return list(spec[0]) if isinstance(spec[0], (list, tuple)) else list(spec[1].get("options", []))
    raise KeyError(name)


def _default(name, t, opts, node):
    if "default" in opts:
        return opts["default"]
    if t == "COMBO":  # the frontend starts a combo on its first option
        return combo_options(node.info, name)[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(t)

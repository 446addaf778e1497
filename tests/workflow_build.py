"""Write UI-format workflows (what the ComfyUI frontend saves) from a few lines of Python.

Nodes get their sockets, widget entries and defaults from the server's node definitions (see
workflow_convert.live_object_info), so the widget order is the node's own and never typed by hand.
Layout (_layout, below): every group is a box of nodes stacked top to bottom, in more than one sub-column when
tall; groups run left to right in the order they are declared, consecutive ones stacked in a column where that
lets the whole graph open larger from the Templates panel, which fits the graph to the window (panel_zoom).
"""
from __future__ import annotations

import contextlib
import uuid
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from workflow_convert import input_specs, is_widget, widget_slots

NODE_WIDTH = 330
TEXT_NODE_WIDTH = 330
GAP = 24
GROUP_PAD = 16
GROUP_TITLE_H = 44
NODE_TITLE_H = 30          # LiteGraph draws a node's title bar above its pos
IMAGE_PANEL_H = {"LoadImage": 180, "SaveImage": 180, "PreviewImage": 150}   # room for the image preview
COLUMN_GAP = 40
GROUP_COLOR = "#3f789e"
# Colours the frontend uses for positive / negative prompts and notes.
COLORS = {"positive": ("#232", "#353"), "negative": ("#322", "#533"), "note": ("#432", "#653")}
FRONTEND_VERSION = "1.32.9"
VIEW = (1600, 1000)
# The canvas left free by the frontend's side bar (~60 px) and top bars (~105 px) in that window, with a margin.
VIEW_AREA = (VIEW[0] - 140, VIEW[1] - 170)
GROUP_FONT = 24
# The Templates panel opens a workflow with the frontend's fitToBounds at its default zoom 0.75: scale =
# min(0.75 * window width / graph width, 0.75 * window height / graph height), the saved extra.ds ignored
# (frontends 1.49 and 1.58). The layout is made for the smallest common laptop window; tests/test_browser.py
# measures the zoom in both windows.
PANEL_FIT = 0.75
PANEL_WINDOWS = ((1600, 1000), (1366, 768))
GROUP_TITLE_CHAR_W = 0.6   # x GROUP_FONT: a wide estimate of a group title's width per character (Arial)


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
        self.groups: list[dict] = []   # {"title", "nodes": [...], "bounding" once laid out}
        self._group = None

    @contextlib.contextmanager
    def group(self, title: str, column: int | None = None):
        """Nodes made inside the `with` belong to this group. `column` is ignored (the layout packs the groups
        itself, in the order they are declared); it stays so that recipes written with it still run."""
        grp = {"title": title, "nodes": []}
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
        node.height = 14 + 24 * rows + 90 * len(text_widgets) + IMAGE_PANEL_H.get(kind, 0)
        return self._add(node)

    def note(self, text: str, title: str = "Note", width: int = NODE_WIDTH) -> Node:
        """A Markdown note, as tall as its text needs at this width (note_height)."""
        node = Node(len(self.nodes) + 1, "MarkdownNote", None, title, {"text": text}, color=COLORS["note"],
                    width=width, height=note_height(text, width))
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
        scale, offset = self._view()
        groups_json = [{"id": i + 1, "title": g["title"], "bounding": g["bounding"], "color": GROUP_COLOR,
                        "font_size": GROUP_FONT, "flags": {}} for i, g in enumerate(self.groups)]
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

    # --- layout: positions and sizes only; nothing above depends on them ---

    def _layout(self) -> None:
        """Place every node and group. Tried: every split of the groups (in declared order) into columns of
        consecutive groups, with each group wrapped into as many sub-columns as fit the column's height; kept:
        the one the Templates panel opens largest in its smallest window, then the one with the fewest wraps (a group reads top to
        bottom), then the one with the most columns (columns read left to right)."""
        options = [_packings(g) for g in self.groups]
        n, best = len(self.groups), None
        for cuts in itertools.product((False, True), repeat=n - 1):
            columns, start = [], 0
            for i, cut in enumerate(cuts, 1):
                if cut:
                    columns.append(list(range(start, i)))
                    start = i
            columns.append(list(range(start, n)))
            for choice in itertools.product(*options):
                widths = [max(choice[i][1] for i in col) for col in columns]
                heights = [sum(choice[i][2] for i in col) + GAP * (len(col) - 1) for col in columns]
                w, h = sum(widths) + COLUMN_GAP * (len(columns) - 1), max(heights)
                scale = min(1.0, panel_zoom(w, h, PANEL_WINDOWS[-1]))
                key = (round(scale, 2), -sum(c[3] for c in choice), len(columns))
                if best is None or key > best[0]:
                    best = (key, choice, columns, widths)
        _, choice, columns, widths = best
        x = 0
        for col, width in zip(columns, widths):
            y = 0
            for i in col:
                positions, _, height, _ = choice[i]
                for node in self.groups[i]["nodes"]:
                    px, py = positions[node.id]
                    node.pos = (x + px, y + py)
                self.groups[i]["bounding"] = [x, y, width, height]   # groups of a column share its width
                y += height + GAP
            x += width + COLUMN_GAP

    def _view(self) -> tuple[float, list]:
        """extra.ds: the scale that shows the whole graph in VIEW_AREA, and the offset that centres it there."""
        left = min(g["bounding"][0] for g in self.groups)
        top = min(g["bounding"][1] for g in self.groups)
        right = max(g["bounding"][0] + g["bounding"][2] for g in self.groups)
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in self.groups)
        w, h = right - left, bottom - top
        scale = math.floor(min(1.0, VIEW_AREA[0] / w, VIEW_AREA[1] / h) * 1000) / 1000
        margin_x = (VIEW[0] - VIEW_AREA[0]) // 2 + 40 + (VIEW_AREA[0] - w * scale) / 2   # the side bar is on the left
        margin_y = (VIEW[1] - VIEW_AREA[1]) // 2 + 35 + (VIEW_AREA[1] - h * scale) / 2   # the top bars
        return scale, [round(margin_x / scale - left), round(margin_y / scale - top)]


def panel_zoom(width: float, height: float, window: tuple[int, int]) -> float:
    """The zoom the Templates panel opens a graph of this size (graph units) at in `window` (CSS px)."""
    return min(PANEL_FIT * window[0] / max(width, 300), PANEL_FIT * window[1] / max(height, 300))


# How the frontend (1.32) sets a MarkdownNote: 10 px text, 11 px lines, about 10 px between blocks, 20 px of the
# node's width taken by the editor's inset. The estimates below are on the generous side (a character is taken as
# wide as an average one plus markup), and the browser test checks that every note shows all of its text.
NOTE_CHAR_W, NOTE_CODE_CHAR_W = 5.6, 6.2
NOTE_LINE_H, NOTE_HEADING_H, NOTE_BLOCK_GAP = 12, 20, 11
NOTE_INSET_W, NOTE_INSET_H = 20, 44


def note_height(text: str, width: int) -> int:
    """The node height a MarkdownNote of this width needs to show `text` without scrolling."""
    inner = width - NOTE_INSET_W
    height, in_code = 0, False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
            height += NOTE_BLOCK_GAP // 2 + 4
        elif in_code:
            height += NOTE_LINE_H * max(1, math.ceil(len(line) * NOTE_CODE_CHAR_W / inner))
        elif not line.strip():
            height += NOTE_BLOCK_GAP
        elif line.startswith("#"):
            height += NOTE_HEADING_H * max(1, math.ceil(len(line) * NOTE_CHAR_W * 1.6 / inner))
        else:
            indent = 20 if line.lstrip().startswith(("- ", "* ")) else 0
            height += NOTE_LINE_H * max(1, math.ceil(len(line) * NOTE_CHAR_W / (inner - indent)))
    return math.ceil(height + NOTE_INSET_H)


def _packings(group: dict) -> list[tuple]:
    """The distinct ways to wrap a group (see _pack_group), none both wider and taller than another."""
    found = {}
    for wrap_at in range(300, 2401, 25):
        packed = _pack_group(group, wrap_at)
        found.setdefault(packed[1:3], packed)
    return [p for (w, h), p in found.items() if not any(w2 <= w and h2 <= h and (w2, h2) != (w, h)
                                                      for w2, h2 in found)]


def _pack_group(group: dict, wrap_at: int) -> tuple[dict, int, int, int]:
    """A group's nodes top to bottom, starting a further sub-column where the next node would end below
    `wrap_at` (a taller node gets a sub-column of its own). Returns (node id -> position relative to the
    group, width, height, number of wraps); the group is at least as wide as its title."""
    columns = [[]]
    used = 0
    for node in group["nodes"]:
        need = NODE_TITLE_H + node.height
        if columns[-1] and used + GAP + need > wrap_at:
            columns.append([])
            used = 0
        used += (GAP if columns[-1] else 0) + need
        columns[-1].append(node)
    positions, x, height = {}, GROUP_PAD, 0
    for col in columns:
        y = GROUP_TITLE_H
        for node in col:
            positions[node.id] = (x, y + NODE_TITLE_H)
            y += NODE_TITLE_H + node.height + GAP
        height = max(height, y - GAP + GROUP_PAD)
        x += max(node.width for node in col) + GAP
    title_width = math.ceil(len(group["title"]) * GROUP_TITLE_CHAR_W * GROUP_FONT) + 2 * GROUP_PAD
    return positions, max(x - GAP + GROUP_PAD, title_width), height, len(columns) - 1


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

"""The example workflows' layout and thumbnails, read from the files (fast; tests/test_browser.py checks the
same layout in the real frontend, with the real fonts and zoom threshold).

- Each opens (extra.ds) at a zoom of at least 0.6, the frontend's default low-quality threshold, below which
  every node is drawn as a blank box; every node lies inside its group; groups do not overlap, and no group's
  title is (by a generous estimate) wider than the group, so no title runs into the next one.
- Each opens from the Templates panel (which fits the graph to the window, ignoring extra.ds) at a zoom of at least
  0.6 in a 1600 x 1000 window, by the frontend's own fit formula (workflow_build.panel_zoom; tests/test_browser.py
  measures it).
- Each thumbnail (example_workflows/<name>.jpg) is the card tests/thumbnail_stamp.py describes (its hash is in the
  JPEG's comment), and at the panel's 200 px the eight cards differ visibly from one another.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from thumbnail_stamp import CARDS, card_hash, read_stamp
from workflow_build import GROUP_PAD, GROUP_TITLE_CHAR_W, NODE_TITLE_H, PANEL_WINDOWS, panel_zoom
from workflow_shrink import WORKFLOW_DIR, WORKFLOWS, load

LOW_QUALITY_ZOOM = 0.6
RERUN = "python3 scripts/comfy_host.py python scripts/template_thumbnails.py"
CARD_PX = 200                 # about the size the Templates panel shows a thumbnail at
MIN_CARD_DIFFERENCE = 5.0     # mean |difference| per channel (0-255) between any two cards at CARD_PX


def rect_inside(inner, outer) -> bool:
    (x, y, w, h), (ox, oy, ow, oh) = inner, outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_above_the_low_quality_zoom(name):
    assert load(name)["extra"]["ds"]["scale"] >= LOW_QUALITY_ZOOM


@pytest.mark.parametrize("name", WORKFLOWS)
def test_templates_panel_opens_it_above_the_low_quality_zoom(name):
    boxes = [g["bounding"] for g in load(name)["groups"]]
    width = max(x + w for x, _, w, _ in boxes) - min(x for x, _, _, _ in boxes)
    height = max(y + h for _, y, _, h in boxes) - min(y for _, y, _, _ in boxes)
    assert panel_zoom(width, height, PANEL_WINDOWS[0]) >= LOW_QUALITY_ZOOM, (width, height)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_groups_hold_their_nodes_and_titles_without_overlap(name):
    wf = load(name)
    groups = wf["groups"]
    for node in wf["nodes"]:
        box = [node["pos"][0], node["pos"][1] - NODE_TITLE_H, node["size"][0], node["size"][1] + NODE_TITLE_H]
        assert sum(rect_inside(box, g["bounding"]) for g in groups) == 1, f"node {node['id']} is not in one group"
    for g in groups:
        title_width = len(g["title"]) * GROUP_TITLE_CHAR_W * g["font_size"] + GROUP_PAD
        assert title_width <= g["bounding"][2], f"the title of {g['title']!r} runs past its group"
    for a, b in itertools.combinations(groups, 2):
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounding"], b["bounding"]
        assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (a["title"], b["title"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_thumbnail_shows_the_current_workflow(name):
    jpeg = WORKFLOW_DIR / (Path(name).stem + ".jpg")
    assert jpeg.is_file(), f"no thumbnail for {name}: run {RERUN}"
    assert read_stamp(jpeg) == card_hash(name), f"{jpeg.name} is not the card thumbnail_stamp.CARDS gives: run {RERUN}"


def test_every_workflow_has_a_card():
    assert sorted(CARDS) == sorted(WORKFLOWS)


def test_cards_tell_the_workflows_apart_at_panel_size():
    import numpy as np
    from PIL import Image

    small = {}
    for name in WORKFLOWS:
        with Image.open(WORKFLOW_DIR / (Path(name).stem + ".jpg")) as image:
            small[name] = np.asarray(image.convert("RGB").resize((CARD_PX, CARD_PX), Image.LANCZOS), dtype=float)
    for a, b in itertools.combinations(WORKFLOWS, 2):
        difference = np.abs(small[a] - small[b]).mean()
        assert difference >= MIN_CARD_DIFFERENCE, f"{a} and {b} look alike at {CARD_PX} px ({difference:.1f})"

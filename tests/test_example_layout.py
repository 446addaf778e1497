"""The example workflows' layout and thumbnails, read from the files (fast; tests/test_browser.py checks the
same layout in the real frontend, with the real fonts and zoom threshold).

- Each opens (extra.ds) at a zoom of at least 0.6, the frontend's default low-quality threshold, below which
  every node is drawn as a blank box; every node lies inside its group; groups do not overlap, and no group's
  title is (by a generous estimate) wider than the group, so no title runs into the next one.
- Each thumbnail (example_workflows/<name>.jpg) carries the hash of the workflow it shows: a workflow changed
  after its picture was taken fails here until scripts/workflow_screenshots.py is run again.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from thumbnail_stamp import drawn_content_hash, read_stamp
from workflow_build import GROUP_PAD, GROUP_TITLE_CHAR_W, NODE_TITLE_H
from workflow_shrink import WORKFLOW_DIR, WORKFLOWS, load

LOW_QUALITY_ZOOM = 0.6
RERUN = ("python3 scripts/comfy_host.py python scripts/workflow_screenshots.py "
         "--ipadapter-pack <ComfyUI_IPAdapter_plus checkout or .tar.gz>")


def rect_inside(inner, outer) -> bool:
    (x, y, w, h), (ox, oy, ow, oh) = inner, outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_above_the_low_quality_zoom(name):
    assert load(name)["extra"]["ds"]["scale"] >= LOW_QUALITY_ZOOM


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
    assert read_stamp(jpeg) == drawn_content_hash(load(name)), f"{jpeg.name} shows an older {name}: run {RERUN}"

"""What ties a thumbnail (example_workflows/<name>.jpg) to the workflow it shows: a hash of what the frontend
draws of the workflow, written into the JPEG's comment by scripts/workflow_screenshots.py and compared by
tests/test_example_layout.py, so a changed workflow with an old picture fails a test.

Only drawn content counts (node types, titles, places, sizes, widget values, colours, links, groups): a new
extension version in the nodes' properties or a new download URL does not make a picture stale.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

STAMP_PREFIX = "linfusion-thumbnail sha256:"
DRAWN_NODE_KEYS = ("type", "title", "pos", "size", "widgets_values", "color", "bgcolor", "mode", "flags")


def drawn_content_hash(workflow: dict) -> str:
    drawn = {"nodes": [{k: n.get(k) for k in DRAWN_NODE_KEYS} for n in workflow["nodes"]],
             "links": workflow["links"], "groups": workflow["groups"]}
    return STAMP_PREFIX + hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()


def read_stamp(jpeg: Path) -> str | None:
    from PIL import Image

    with Image.open(jpeg) as image:
        comment = image.info.get("comment")
    if isinstance(comment, bytes):
        comment = comment.decode("ascii", "replace")
    return comment if comment and comment.startswith(STAMP_PREFIX) else None

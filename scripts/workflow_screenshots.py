#!/usr/bin/env python3
"""Pictures of the example workflows as the ComfyUI frontend draws them (headless Chromium).

    python3 scripts/comfy_host.py python scripts/workflow_screenshots.py [--ipadapter-pack PATH]

Run it after scripts/example_workflows.py whenever a workflow changes: tests/test_example_layout.py fails while
a thumbnail shows an older workflow. Writes
- example_workflows/<name>.jpg, the thumbnails of ComfyUI's template browser: the group(s) that set the workflow
  apart (THUMBNAIL_FOCUS), cropped to them and zoomed so their nodes are readable; the JPEG comment holds the
  hash of the workflow it shows (tests/thumbnail_stamp.py);
- docs/workflow_sd15_txt2img_2048.png, the README's picture: workflow 1 as it opens.
No UI chrome: only the canvas is captured, with the canvas info text and the canvas menu switched off.
Workflow 5 needs the ComfyUI_IPAdapter_plus pack to draw its two nodes (else they are red "missing" boxes):
PATH is a checkout of cubiq/ComfyUI_IPAdapter_plus or a .tar.gz of one (default: $LINFUSION_IPADAPTER_PACK).
It is linked into the screenshot server's own temporary custom_nodes only; without it workflow 5 is skipped.
Needs Debian's `chromium`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from comfy_browser import (FREE_CANVAS, canvas_view, chromium_missing_reason, chromium_page,  # noqa: E402
                           close_dialogs, comfy_ui_server, load_workflow)
from scratch import scratch_dir, unpack_tar  # noqa: E402
from thumbnail_stamp import drawn_content_hash  # noqa: E402

THUMBNAIL_LONG_SIDE = 768    # px; the template browser fits the picture into a square card
FOCUS_MARGIN = 16             # graph units around the focused groups
# Group numbers a thumbnail shows: the part that tells this workflow from the others.
THUMBNAIL_FOCUS = {
    "1_sd15_txt2img_2048.json": ["1."],     # the note's heading, checkpoint, Load + Apply LinFusion
    "2_sd15_16k_ladder.json": ["4."],       # tiled UNet, the ladder to 16K, tiled decode
    "3_sdxl_demofusion_8k.json": ["4."],    # the DemoFusion stages
    "4_controlnet_2048.json": ["4."],       # LinFusion ControlNet
    "5_ipadapter.json": ["2."],             # reference image + IPAdapter
    "6_lora_2048.json": ["1."],             # the LoRA before LinFusion
    "7_super_resolution.json": ["4."],      # the x4 upscale
    "8_demofusion_ksampler.json": ["4."],   # DemoFusion Refine on a KSampler
}
NEEDS_IPADAPTER = {"5_ipadapter.json"}
README_PICTURE = ("1_sd15_txt2img_2048.json", REPO / "docs" / "workflow_sd15_txt2img_2048.png")
# Chrome the canvas draws over the graph: the info text (bottom left) and the zoom menu (bottom right).
NO_CHROME = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False}

FOCUS_JS = """([prefixes, margin, crop]) => {
    const c = window.app.canvas;
    const boxes = window.app.graph.groups.filter(g => prefixes.some(p => g.title.startsWith(p))).map(g => g._bounding);
    if (!boxes.length) return null;
    const x0 = Math.min(...boxes.map(b => b[0])) - margin, y0 = Math.min(...boxes.map(b => b[1])) - margin;
    const x1 = Math.max(...boxes.map(b => b[0] + b[2])) + margin, y1 = Math.max(...boxes.map(b => b[1] + b[3])) + margin;
    const s = Math.min(1, crop.width / (x1 - x0), crop.height / (y1 - y0));
    c.ds.scale = s;
    c.ds.offset[0] = (crop.x + (crop.width - (x1 - x0) * s) / 2) / s - x0;
    c.ds.offset[1] = (crop.y + (crop.height - (y1 - y0) * s) / 2) / s - y0;
    c.setDirty(true, true);
    c.draw(true, true);
    const [ox, oy] = c.ds.offset;
    return {scale: s, clip: {x: Math.floor((x0 + ox) * s), y: Math.floor((y0 + oy) * s),
                             width: Math.ceil((x1 - x0) * s), height: Math.ceil((y1 - y0) * s)}};
}"""


def ipadapter_pack(path: str | None, scratch: Path) -> Path | None:
    """A folder of ComfyUI_IPAdapter_plus: `path` itself, or its tarball unpacked into `scratch`."""
    if not path:
        return None
    src = Path(path)
    if src.is_dir():
        return src
    unpack_tar(src, scratch)
    return next(p for p in scratch.iterdir() if p.is_dir())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipadapter-pack", default=os.environ.get("LINFUSION_IPADAPTER_PACK"))
    args = parser.parse_args(argv)
    reason = chromium_missing_reason()
    if reason:
        sys.exit(reason)
    from PIL import Image

    scratch = scratch_dir("linfusion-screens-")
    pack = ipadapter_pack(args.ipadapter_pack, scratch / "packs")
    packs = (pack,) if pack else ()
    with comfy_ui_server(Path(os.environ["COMFYUI_PATH"]), scratch / "models", scratch, settings=NO_CHROME,
                         custom_nodes=packs) as (url, _):
        with chromium_page(url) as page:
            for path in sorted((REPO / "example_workflows").glob("*.json")):
                if path.name in NEEDS_IPADAPTER and not pack:
                    print(f"skipped {path.name}: give --ipadapter-pack (its IP-Adapter nodes would be drawn missing)")
                    continue
                workflow = json.loads(path.read_text())
                loaded = load_workflow(page, workflow, path.name)
                if loaded["missing"]:
                    sys.exit(f"{path.name}: node types missing on the screenshot server: {loaded['missing']}")
                close_dialogs(page)
                page.wait_for_timeout(500)
                if path.name == README_PICTURE[0]:
                    png = page.screenshot(clip=FREE_CANVAS)
                    README_PICTURE[1].parent.mkdir(exist_ok=True)
                    Image.open(io.BytesIO(png)).convert("RGB").save(README_PICTURE[1], optimize=True)
                    print(f"wrote {README_PICTURE[1].relative_to(REPO)}")
                focus = page.evaluate(FOCUS_JS, [THUMBNAIL_FOCUS[path.name], FOCUS_MARGIN, FREE_CANVAS])
                if focus is None:
                    sys.exit(f"{path.name}: no group starts with {THUMBNAIL_FOCUS[path.name]}; update THUMBNAIL_FOCUS")
                scale = focus["scale"]
                if canvas_view(page)["low_quality"]:
                    sys.exit(f"{path.name}: the focused groups only fit at zoom {scale:.2f}, where nodes are blank "
                             "boxes; focus on fewer groups")
                page.wait_for_timeout(200)
                image = Image.open(io.BytesIO(page.screenshot(clip=focus["clip"]))).convert("RGB")
                shrink = min(1.0, THUMBNAIL_LONG_SIDE / max(image.size))
                thumb = image.resize((round(image.width * shrink), round(image.height * shrink)), Image.LANCZOS)
                target = path.with_suffix(".jpg")
                thumb.save(target, quality=85, optimize=True, comment=drawn_content_hash(workflow).encode())
                print(f"wrote {target.relative_to(REPO)} (zoom {scale:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

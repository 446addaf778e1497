#!/usr/bin/env python3
"""The README's picture of example workflow 1 as the ComfyUI frontend draws it (headless Chromium).

    python3 scripts/comfy_host.py python scripts/workflow_screenshots.py

Writes docs/workflow_sd15_txt2img_2048.png: workflow 1 as it opens, the canvas only (no UI chrome; the canvas
info text and menu switched off). The Templates panel's thumbnails are cards, not screenshots:
scripts/template_thumbnails.py. Needs Debian's `chromium`.
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

from comfy_browser import (FREE_CANVAS, chromium_missing_reason, chromium_page, close_dialogs,  # noqa: E402
                           comfy_ui_server, load_workflow)
from scratch import scratch_dir  # noqa: E402

README_PICTURE = ("linfusion_1_sd15_txt2img_2048.json", REPO / "docs" / "workflow_sd15_txt2img_2048.png")
# Chrome the canvas draws over the graph: the info text (bottom left) and the zoom menu (bottom right).
NO_CHROME = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False}


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    reason = chromium_missing_reason()
    if reason:
        sys.exit(reason)
    from PIL import Image

    scratch = scratch_dir("linfusion-screens-")
    name, target = README_PICTURE
    with comfy_ui_server(Path(os.environ["COMFYUI_PATH"]), scratch / "models", scratch, settings=NO_CHROME) as (url, _):
        with chromium_page(url) as page:
            workflow = json.loads((REPO / "example_workflows" / name).read_text())
            loaded = load_workflow(page, workflow, name)
            if loaded["missing"]:
                sys.exit(f"{name}: node types missing on the screenshot server: {loaded['missing']}")
            close_dialogs(page)
            page.wait_for_timeout(500)
            png = page.screenshot(clip=FREE_CANVAS)
            target.parent.mkdir(exist_ok=True)
            Image.open(io.BytesIO(png)).convert("RGB").save(target, optimize=True)
            print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

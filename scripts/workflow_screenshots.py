#!/usr/bin/env python3
"""Pictures of the example workflows as the ComfyUI frontend draws them (headless Chromium).

    python3 scripts/comfy_host.py python scripts/workflow_screenshots.py

Writes example_workflows/<name>.jpg (the thumbnails ComfyUI's template browser shows next to each
workflow) and docs/workflow_sd15_txt2img_2048.png (the README's picture). Needs Debian's `chromium`.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from comfy_browser import chromium_missing_reason, chromium_page, close_dialogs, comfy_ui_server, load_workflow  # noqa: E402

CANVAS_CLIP = {"x": 60, "y": 105, "width": 1540, "height": 895}   # the graph, without the side and top bars
THUMBNAIL_WIDTH = 768
README_PICTURE = ("1_sd15_txt2img_2048.json", REPO / "docs" / "workflow_sd15_txt2img_2048.png")


def main() -> int:
    reason = chromium_missing_reason()
    if reason:
        sys.exit(reason)
    from PIL import Image

    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    logs = Path(tempfile.mkdtemp(prefix="linfusion-screens-"))
    with comfy_ui_server(Path(os.environ["COMFYUI_PATH"]), logs / "models", logs) as (url, _):
        with chromium_page(url) as page:
            for path in workflows:
                load_workflow(page, json.loads(path.read_text()), path.name)
                close_dialogs(page)
                page.wait_for_timeout(500)
                png = page.screenshot(clip=CANVAS_CLIP)
                image = Image.open(io.BytesIO(png)).convert("RGB")
                if path.name == README_PICTURE[0]:
                    README_PICTURE[1].parent.mkdir(exist_ok=True)
                    image.save(README_PICTURE[1], optimize=True)
                    print(f"wrote {README_PICTURE[1].relative_to(REPO)}")
                thumb = image.resize((THUMBNAIL_WIDTH, round(image.height * THUMBNAIL_WIDTH / image.width)),
                                     Image.LANCZOS)
                thumb.save(path.with_suffix(".jpg"), quality=82, optimize=True)
                print(f"wrote {path.with_suffix('.jpg').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

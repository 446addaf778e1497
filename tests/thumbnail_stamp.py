"""What the thumbnails (example_workflows/<name>.jpg, the Templates panel's cards) show, and what ties each
picture to it: scripts/template_thumbnails.py draws CARDS and writes the hash of the card into the JPEG's
comment; tests/test_example_layout.py compares it, so a card changed here without redrawing fails a test.

A card says what the workflow makes: model family, the size it ends at (with its start size: the model's
native size for txt2img, the input for an upscale), the recipe, and the workflow's number (its file name's);
`pattern` marks what steers it (ControlNet edges, an IP-Adapter's reference image, a pixel-art LoRA's pixels).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

STAMP_PREFIX = "linfusion-thumbnail sha256:"
CARD_VERSION = 2       # bump when the drawing changes

CARDS = {
    "linfusion_1_sd15_txt2img_2048.json": dict(number="1", family="SD 1.5", size="2048 x 2048", start=(512, 512),
                                               result=(2048, 2048), recipe="txt2img, one pass", detail="4x SD 1.5's 512 px"),
    "linfusion_2_sd15_16k_ladder.json": dict(number="2", family="SD 1.5", size="16384 x 8192", start=(1024, 512),
                                             result=(16384, 8192), recipe="SDEdit ladder", detail="1024 x 512, x2 four times"),
    "linfusion_3_sdxl_demofusion_8k.json": dict(number="3", family="SDXL", size="8192 x 8192", start=(1024, 1024),
                                                result=(8192, 8192), recipe="DemoFusion ladder", detail="1024 px, x2 three times"),
    "linfusion_4_controlnet_2048.json": dict(number="4", family="SD 1.5", size="2048 x 2048", start=(512, 512),
                                             result=(2048, 2048), recipe="+ ControlNet", detail="Canny edges of your image", pattern="edges"),
    "linfusion_5_ipadapter.json": dict(number="5", family="SD 1.5", size="1536 x 1536", start=(512, 512),
                             result=(1536, 1536), recipe="+ IP-Adapter", detail="image prompt (IPAdapter_plus)", pattern="reference"),
    "linfusion_6_lora_2048.json": dict(number="6", family="SD 1.5", size="2048 x 2048", start=(512, 512),
                             result=(2048, 2048), recipe="+ LoRA", detail="pixel art LoRA, or yours", pattern="pixels"),
    "linfusion_7_super_resolution.json": dict(number="7", family="SDXL", size="your image x4", start=(1024, 1024),
                                              result=(4096, 4096), recipe="super-resolution", detail="two DemoFusion x2 stages"),
    "linfusion_8_demofusion_ksampler.json": dict(number="8", family="SDXL", size="your image x2", start=(1024, 1024),
                                                 result=(2048, 2048), recipe="DemoFusion + KSampler", detail="one stage, nodes to rewire"),
}


def card_hash(name: str) -> str:
    card = {"version": CARD_VERSION, **CARDS[name]}
    return STAMP_PREFIX + hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()


def read_stamp(jpeg: Path) -> str | None:
    from PIL import Image

    with Image.open(jpeg) as image:
        comment = image.info.get("comment")
    if isinstance(comment, bytes):
        comment = comment.decode("ascii", "replace")
    return comment if comment and comment.startswith(STAMP_PREFIX) else None

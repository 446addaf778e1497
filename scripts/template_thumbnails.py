#!/usr/bin/env python3
"""The Templates panel's thumbnails of the example workflows: a card per workflow that says what it makes.

    python3 scripts/comfy_host.py python scripts/template_thumbnails.py

Writes example_workflows/<name>.jpg from CARDS: the model family (colour and name), the size it makes (drawn to
scale against the start size), the recipe in a few words and the workflow's number, large enough to tell the
eight apart at the panel's ~200 px card size. No screenshot of node boxes: at 200 px those all look alike.
The JPEG comment holds the hash of the card's text (tests/thumbnail_stamp.py), so a card changed here without
running this fails tests/test_example_layout.py. Needs only Pillow (the font is Pillow's own).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from thumbnail_stamp import CARDS, card_hash  # noqa: E402

SIDE = 512                      # px; the panel shows it at about 200 px
FAMILY_COLOURS = {"SD 1.5": ((31, 78, 121), (120, 180, 230)), "SDXL": ((92, 42, 110), (210, 150, 235))}
INK = (245, 245, 245)


def font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def centred(draw, y: int, text: str, size: int, fill=INK) -> None:
    f = font(size)
    w = draw.textlength(text, font=f)
    draw.text(((SIDE - w) / 2, y), text, font=f, fill=fill)


def draw_card(card: dict):
    """One card: family band at the top, the size boxes (start size outlined, result filled, to scale), the
    result size and the recipe below."""
    from PIL import Image, ImageDraw

    dark, light = FAMILY_COLOURS[card["family"]]
    image = Image.new("RGB", (SIDE, SIDE), dark)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, SIDE, 96], fill=light)
    draw.text((22, 14), card["number"], font=font(64), fill=dark)
    f = font(54)
    draw.text((SIDE - 22 - draw.textlength(card["family"], font=f), 20), card["family"], font=f, fill=dark)
    # The result as a box whose area is to scale (log2 of the side) with the start size's box in its corner.
    box_w, box_h = card["result"]
    start_w, start_h = card["start"]
    top, avail_w, avail_h = 118, SIDE - 80, 200
    scale = min(avail_w / box_w, avail_h / box_h)
    x0, y0 = (SIDE - box_w * scale) / 2, top + (avail_h - box_h * scale) / 2
    draw.rectangle([x0, y0, x0 + box_w * scale, y0 + box_h * scale], fill=light)
    x1, y1 = x0 + box_w * scale, y0 + box_h * scale
    pattern = card.get("pattern")
    if pattern == "edges":        # what Canny hands the ControlNet: dark lines across the picture
        for i in range(1, 6):
            draw.line([(x0, y0 + (y1 - y0) * i / 6), (x1, y0 + (y1 - y0) * (6 - i) / 6)], fill=dark, width=10)
    elif pattern == "pixels":     # pixel art: a coarse checkerboard
        cell = (x1 - x0) / 8
        for i in range(8):
            for j in range(8):
                if (i + j) % 2:
                    draw.rectangle([x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell], fill=dark)
    elif pattern == "reference":  # the image prompt: a disc standing for the reference picture
        r = (x1 - x0) * 0.3
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dark)
    sw, sh = max(start_w * scale, 14), max(start_h * scale, 14 * start_h / start_w)
    draw.rectangle([x0, y0 + box_h * scale - sh, x0 + sw, y0 + box_h * scale], outline=dark, width=5)
    centred(draw, 338, card["size"], 60)
    centred(draw, 412, card["recipe"], 40)
    centred(draw, 462, card["detail"], 28, fill=light)
    return image


def main() -> int:
    for name, card in CARDS.items():
        target = REPO / "example_workflows" / (Path(name).stem + ".jpg")
        draw_card(card).save(target, quality=88, optimize=True, comment=card_hash(name).encode())
        print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

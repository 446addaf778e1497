"""The example workflows as the tests see them, and the test-only override that shrinks them to run on
the fixture models in seconds: small base latents, few steps, small VAE tiles, fixture model names."""
from __future__ import annotations

import json
from pathlib import Path

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(p.name for p in WORKFLOW_DIR.glob("*.json"))
NEEDS_THIRD_PARTY = {"linfusion_5_ipadapter.json"}   # ComfyUI_IPAdapter_plus nodes
TEST_LONG_SIDE = 64        # px of the shrunk base image
TEST_STEPS = 2
TEST_BASE_STEPS = 4        # a stage of strength s runs int (sd15) or ceil (sdxl) of 4 * s steps, at least 1
TEST_MAX_STAGES = 2
TEST_TILE = 64             # px, LinFusion tiled VAE: the 256 px final image is 4 x 2 tiles
TEST_LADDER_TILE = 256     # px, the ladder's VAE tiles: ComfyUI's tiled encode needs tile / 2 > overlap (64)
TEST_UNET_TILE = 8         # latent px, tiled UNet: the last ladder stage (32 x 16 latent) is 4 x 2 tiles
DEMOFUSION_TEST_DILATION = 2   # what "auto" resolves to for the full-size x2 of a 1024 px image


def load(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / name).read_text())


def family_of(prompt) -> str:
    names = [n["inputs"].get("linfusion_name", "") for n in prompt.values() if n["class_type"] == "LinFusionLoader"]
    return "sdxl" if any("XL" in n for n in names) else "sd15"


def shrink(prompt: dict, fixtures, input_image: str) -> dict:
    """The test-only override: fixture models, a small base image, few steps, small tiles."""
    family = family_of(prompt)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = fixtures.checkpoint[family]
        elif kind == "LinFusionLoader":
            inputs["linfusion_name"] = fixtures.linfusion_folder[family]
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = fixtures.controlnet_sd15
        elif kind == "LoraLoader":
            inputs["lora_name"] = fixtures.lora_sd15
        elif kind == "LoadImage":
            inputs["image"] = input_image
        elif kind == "EmptyLatentImage":
            scale = TEST_LONG_SIDE / max(inputs["width"], inputs["height"])
            inputs["width"], inputs["height"] = (max(8, round(inputs[k] * scale / 8) * 8) for k in ("width", "height"))
        elif kind in ("KSampler", "LinFusionLeadingSigmas", "LinFusionDEISSampler"):
            inputs["steps"] = TEST_STEPS
        elif kind == "LinFusionProgressiveUpscale":
            inputs["base_steps"] = TEST_BASE_STEPS
            inputs["stages"] = min(inputs["stages"], TEST_MAX_STAGES)
            inputs["vae_tile_size"] = TEST_LADDER_TILE if inputs["vae_tile_size"] else 0
        elif kind == "LinFusionVAEDecodeTiled":
            inputs["tile_size"] = TEST_TILE
        elif kind == "LinFusionTiledUNet":
            inputs["tile_size"] = TEST_UNET_TILE
        elif kind == "LinFusionDemoFusion" and inputs["dilation_ratio"] == 0:
            # Auto would give 1 on the tiny test image; the dilated branch is what the full-size run uses.
            inputs["dilation_ratio"] = DEMOFUSION_TEST_DILATION
    return prompt


def expected_size(prompt: dict, image_size) -> tuple[int, int]:
    """(width, height) of the saved image: the base size doubled once per upscale stage, scaled by any
    ImageScaleBy."""
    latents = [n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage"]
    w, h = (latents[0]["width"], latents[0]["height"]) if latents else image_size
    for n in prompt.values():
        if n["class_type"] == "LinFusionProgressiveUpscale":
            w, h = w * 2 ** n["inputs"]["stages"], h * 2 ** n["inputs"]["stages"]
        elif n["class_type"] == "ImageScaleBy":
            w, h = round(w * n["inputs"]["scale_by"]), round(h * n["inputs"]["scale_by"])
    return w, h



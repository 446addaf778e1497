"""ComfyUI_UltimateSDUpscale (the real pack, tests/third_party_packs.py) with a LinFusion model, through the executor.

The pack crops the upscaled image into tiles, samples each tile with KSampler (its `modules.processing.sample`)
and blends them back with its own masks; with a seam-fix mode it samples bands over the seams too. Its
"No Upscale" node is used (its upscaling node needs an upscale model, and ComfyUI's loader for those needs
spandrel, which the test host leaves out); ComfyUI's ImageScaleBy does the upscaling, as users pair them.
Shown: every tile and seam band is sampled with LinFusion's attention at the sampled tile's size (100 tokens for
a 64 px tile with its 16 px padding), the seam fix adds its passes, LinFusion changes the result, and the chain composes with LinFusion
Tiled UNet (the tiled UNet engine runs inside the pack's tiles).
"""
from __future__ import annotations

import pytest
import torch

from pack_graphs import LinFusionTokens, add_linfusion, blocky_input_image
from third_party_packs import ULTIMATE_SD_UPSCALE, PackCalls, require_pack

pytestmark = pytest.mark.slow
TILE, PADDING = 64, 16   # px: the 128 px image is 2 x 2 tiles; each is sampled with its padding, 80 px
SAMPLED = (TILE + PADDING) // 8      # latent side of one sampled tile (10)


@pytest.fixture(scope="module")
def pack(host):
    return require_pack(ULTIMATE_SD_UPSCALE)


@pytest.fixture(scope="module")
def input_image(host):
    return blocky_input_image("linfusion_usdu_test.png", seed=7)


def usdu_prompt(fixtures, image, *, linfusion=True, seam_fix="None", tiled_unet=False, tile=TILE):
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "img": {"class_type": "LoadImage", "inputs": {"image": image}},
        "up": {"class_type": "ImageScaleBy", "inputs": {"image": ["img", 0], "upscale_method": "nearest-exact",
                                                         "scale_by": 2.0}},
        "usdu": {"class_type": "UltimateSDUpscaleNoUpscale", "inputs": {
            "upscaled_image": ["up", 0], "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "vae": ["ckpt", 2], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 0.5, "mode_type": "Linear", "tile_width": tile, "tile_height": tile, "mask_blur": 8,
            "tile_padding": PADDING, "seam_fix_mode": seam_fix, "seam_fix_denoise": 0.5, "seam_fix_width": 16,
            "seam_fix_mask_blur": 8, "seam_fix_padding": 16, "force_uniform_tiles": True, "tiled_decode": False,
            "batch_size": 1}},
        "out": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["usdu", 0]}},
    }
    if linfusion:
        add_linfusion(p, fixtures.linfusion_folder["sd15"])
        p["usdu"]["inputs"]["model"] = ["apply", 0]
    if tiled_unet:
        p["tiled"] = {"class_type": "LinFusionTiledUNet", "inputs": {
            "model": ["apply", 0], "tile_size": 8, "park_device": "cpu", "mode": "exact"}}
        p["usdu"]["inputs"]["model"] = ["tiled", 0]
    return p


def run(host, core, pack, prompt):
    # The pack's A1111 shim modules/processing.py (the pack takes its modules out of sys.modules after its
    # import; its functions keep their globals): process_images samples each tile through its `sample`.
    import nodes
    processing = nodes.NODE_CLASS_MAPPINGS["UltimateSDUpscaleNoUpscale"].upscale.__globals__[
        "StableDiffusionProcessing"].__init__.__globals__
    samples = []
    original = processing["sample"]

    def spy(*args, **kwargs):
        samples.append(tuple(args[8]["samples"].shape))     # the tile's latent
        return original(*args, **kwargs)
    processing["sample"] = spy
    host.reset_cache()      # every node runs (a cached capture node would capture nothing)
    try:
        with LinFusionTokens(core) as seen:
            image = host.run(prompt).captured["out"]
    finally:
        processing["sample"] = original
    assert torch.isfinite(image).all() and image.shape == (1, 128, 128, 3)
    return image, samples, seen


def test_every_tile_and_seam_band_runs_linfusion(host, core, fixtures, pack, input_image):
    plain, plain_tiles, _ = run(host, core, pack, usdu_prompt(fixtures, input_image, linfusion=False))
    lf, tiles, seen = run(host, core, pack, usdu_prompt(fixtures, input_image))
    seamed, seam_tiles, seen_seamed = run(host, core, pack, usdu_prompt(fixtures, input_image, seam_fix="Half Tile"))
    assert tiles == plain_tiles == [(1, 4, SAMPLED, SAMPLED)] * 4, tiles          # 2 x 2 tiles of 64 px + padding
    assert max(seen.tokens) == SAMPLED ** 2 and len(seen.shapes) > 0
    assert len(seam_tiles) > len(tiles), "the seam fix sampled nothing more"
    assert max(seen_seamed.tokens) <= SAMPLED ** 2 and len(seen_seamed.shapes) > len(seen.shapes)
    print(f"[usdu] tiles {tiles}, seam-fix samples {len(seam_tiles) - len(tiles)}; LinFusion tokens "
          f"{sorted(seen.tokens)}; max |LinFusion - plain| {(lf - plain).abs().max().item():.4g}, "
          f"|seam fix - none| {(seamed - lf).abs().max().item():.4g}")
    assert (lf - plain).abs().max() > 1e-2, "LinFusion changed nothing"
    assert (seamed - lf).abs().max() > 1e-3, "the seam fix changed nothing"


def test_composes_with_linfusion_tiled_unet(host, core, fixtures, pack, input_image):
    """One 128 px USDU tile (144 px with padding: an 18 x 18 latent) run by the tiled UNet in 8 x 8 latent tiles
    ("exact" mode): the same image as LinFusion untiled, up to rounding."""
    lf, tiles, _ = run(host, core, pack, usdu_prompt(fixtures, input_image, tile=128))
    calls = PackCalls(core.tiling.tiled_unet.TiledUNetRunner, "forward", lambda x, *a, **k: tuple(x.shape))
    with calls:
        tiled, tiled_tiles, seen = run(host, core, pack, usdu_prompt(fixtures, input_image, tile=128,
                                                                     tiled_unet=True))
    side = (128 + PADDING) // 8
    assert tiled_tiles == tiles == [(1, 4, side, side)]
    assert calls.calls and all(c[-2:] == (side, side) for c in calls.calls), calls.calls
    # (The tiled UNet runs LinFusion through its own state passes, not the modules' forward: `seen` stays empty.)
    diff = (tiled - lf).abs().max().item()
    print(f"[usdu] with LinFusion Tiled UNet {len(calls.calls)} runs over {calls.calls[0]}: max |tiled UNet - "
          f"untiled| {diff:.3g}")
    # The pack hands tiles over as 8-bit images, so a float difference at a rounding boundary shows as one level.
    assert diff <= 1 / 255 + 1e-6, f"max diff {diff:.3g}"

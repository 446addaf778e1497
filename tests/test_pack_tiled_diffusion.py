"""ComfyUI-TiledDiffusion (the real pack, tests/third_party_packs.py) over a LinFusion model, through the executor.

The pack wraps the model call (set_model_unet_function_wrapper) and runs the UNet tile by tile; LinFusion
replaces the self-attention inside each tile. Shown for MultiDiffusion and Mixture of Diffusers on a 16 x 16
latent in 8 x 8 tiles (overlap 4): LinFusion's attention sees tiles only (64 tokens at the top level, never the
whole 256), the tiling acts (the latent differs from LinFusion untiled), LinFusion acts under the tiling (it
differs from the tiled model without LinFusion), and one tile covering the whole latent gives LinFusion's
untiled output.
"""
from __future__ import annotations

import pytest
import torch

from pack_graphs import LinFusionTokens, sd15_prompt
from third_party_packs import TILED_DIFFUSION, require_pack

pytestmark = pytest.mark.slow
SIZE = 128          # px: a 16 x 16 latent
TILE, OVERLAP = 64, 32   # px: 8 x 8 latent tiles, 4 latent px of overlap (the pack's smallest overlap step)


@pytest.fixture(scope="module")
def pack(host):
    return require_pack(TILED_DIFFUSION)


def run(host, fixtures, core, *, method=None, tile=TILE, linfusion=True):
    p = sd15_prompt(fixtures, width=SIZE, height=SIZE, linfusion=linfusion)
    if method:
        p["td"] = {"class_type": "TiledDiffusion", "inputs": {
            "model": p["ks"]["inputs"]["model"], "method": method, "tile_width": tile, "tile_height": tile,
            "tile_overlap": OVERLAP, "tile_batch_size": 4}}
        p["ks"]["inputs"]["model"] = ["td", 0]
    host.reset_cache()      # every node runs (a cached capture node would capture nothing)
    with LinFusionTokens(core) as seen:
        out = host.run(p).captured["out"]["samples"]
    assert torch.isfinite(out).all()
    return out, seen


@pytest.mark.parametrize("method", ["MultiDiffusion", "Mixture of Diffusers"])
def test_tiled_diffusion_runs_linfusion_tile_by_tile(host, core, fixtures, pack, method):
    plain_lf, seen_plain = run(host, fixtures, core)
    tiled_lf, seen = run(host, fixtures, core, method=method)
    tiled_only, seen_none = run(host, fixtures, core, method=method, linfusion=False)
    full = (SIZE // 8) ** 2
    assert full in seen_plain.tokens
    assert seen.shapes, "LinFusion's attention never ran under the tiling"
    assert max(seen.tokens) == (TILE // 8) ** 2, f"LinFusion saw {sorted(seen.tokens)} tokens, not 8 x 8 tiles"
    assert not seen_none.shapes
    print(f"[tiled-diffusion] {method}: LinFusion tokens {sorted(seen.tokens)}; max |tiled - untiled| "
          f"{(tiled_lf - plain_lf).abs().max().item():.4g}, |with - without LinFusion| "
          f"{(tiled_lf - tiled_only).abs().max().item():.4g}")
    assert (tiled_lf - plain_lf).abs().max() > 1e-3, "the tiling had no effect"
    assert (tiled_lf - tiled_only).abs().max() > 1e-2, "LinFusion had no effect under the tiling"


def test_one_tile_over_the_whole_latent_is_linfusion_untiled(host, core, fixtures, pack):
    plain_lf, _ = run(host, fixtures, core)
    one_tile, seen = run(host, fixtures, core, method="MultiDiffusion", tile=SIZE)
    assert max(seen.tokens) == (SIZE // 8) ** 2
    diff = (one_tile - plain_lf).abs().max().item()
    print(f"[tiled-diffusion] one whole tile vs untiled: max diff {diff:.3g}")
    assert diff < 1e-4, f"max diff {diff:.3g}"


def test_the_bench_peer_section_uses_the_snapshot_by_default():
    """bench/peers.py runs MultiDiffusion from this same snapshot when no checkout is given."""
    from bench import peers
    from third_party_packs import origin

    commit = origin()[TILED_DIFFUSION].split()[0][:12]     # first: it skips where the snapshots are not beside us
    checkout = peers.snapshot_checkout("tiled_diffusion")
    assert checkout is not None and (checkout / "__init__.py").is_file() and (checkout / "tiled_diffusion.py").is_file()
    assert peers.snapshot_commit("tiled_diffusion") == commit

"""Peers side by side, from checkouts the user names on the command line or, for ComfyUI-TiledDiffusion, by
default the pack snapshot in ../shared/third_party/ (unpacked into a temporary folder; nothing of theirs is
copied here):

- the official LinFusion code (github.com/Huage001/LinFusion): its `LinFusion` mounted on a diffusers
  UNet2DConditionModel built from the SAME random UNet weights (converted with ComfyUI's own key map) and
  the SAME random LinFusion weights; one UNet call at batch 2, what each step of its diffusers pipeline runs;
- ComfyUI-TiledDiffusion (github.com/shiimizu/ComfyUI-TiledDiffusion): its MultiDiffusion on the same
  SDPA MODEL, one sampling step at the same output size.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from scratch import scratch_dir, unpack_tar   # tests/, on sys.path wherever the bench runs

from . import models
from .timing import measure, predict

log = logging.getLogger("LinFusion")
REPO = Path(__file__).resolve().parent.parent
# The pack snapshots the compatibility tests use (tests/third_party_packs.py reads the same folder).
THIRD_PARTY_DIR = Path(os.environ.get("LINFUSION_THIRD_PARTY_DIR", REPO.parent / "shared" / "third_party"))
SNAPSHOTS = {"tiled_diffusion": "ComfyUI-TiledDiffusion"}


def snapshot_checkout(name: str) -> Path | None:
    """The peer's snapshot from THIRD_PARTY_DIR unpacked into a temporary folder, or None where it is absent."""
    tarball = THIRD_PARTY_DIR / f"{SNAPSHOTS[name]}.tar.gz"
    if not tarball.is_file():
        return None
    target = scratch_dir("linfusion-peer-")   # its modules are imported: gone at exit, not before
    unpack_tar(tarball, target)
    return target / SNAPSHOTS[name]


def snapshot_commit(name: str) -> str | None:
    try:
        for line in (THIRD_PARTY_DIR / "ORIGIN.txt").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == SNAPSHOTS[name]:
                return parts[1][:12]
    except OSError:
        pass
    return None


def official_linfusion(checkout: Path, base, weights, family: str, sizes, n, budget, quick: bool):
    """Rows for the official LinFusion (SD1.5 layout); diffusers comes from the host environment."""
    from diffusers import UNet2DConditionModel

    import comfy.utils
    sys.path.insert(0, str(checkout))
    from src.linfusion import LinFusion        # the checkout's package (its README's import)

    cfg = models.unet_config(family, quick)
    width = cfg["model_channels"]
    unet = UNet2DConditionModel(block_out_channels=[width * m for m in cfg["channel_mult"]], cross_attention_dim=768,
                                attention_head_dim=cfg["num_heads"], norm_num_groups=min(32, width))
    ours = base.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    missing, unexpected = unet.load_state_dict({k: ours[v] for k, v in mapping.items() if v in ours}, strict=False)
    if missing:
        raise RuntimeError(f"official LinFusion: {len(missing)} UNet weights not converted, e.g. {missing[:3]}")
    lin = LinFusion(modules_list=[{"dim_n": m.dim, "heads": m.heads, "module_name": m.name,
                                   "projection_mid_dim": None if m.projection_mid_dim == m.dim else m.projection_mid_dim}
                                  for m in weights.modules])
    lin.load_state_dict({k: v.float() for k, v in weights.state_dict.items()})
    lin.mount_to(unet=unet)
    device = models.device()
    unet = unet.to(device).eval()
    rows, last = [], None
    for px in sizes:
        row = {"peer": "official LinFusion (diffusers UNet call)", "family": family, "px": px}
        skip = budget.refuse(predict(last, px * px, 1), n(px))
        if skip:
            rows.append({**row, **skip})
            continue
        x = torch.randn(2, 4, px // 8, px // 8, device=device)
        ctx, t = torch.randn(2, 77, 768, device=device), torch.tensor([500.0, 500.0], device=device)
        row.update(measure(lambda: unet(x, t, encoder_hidden_states=ctx).sample, device, n(px)))
        last = (px * px, row["median_s"])
        rows.append(row)
    return rows


def multidiffusion(checkout: Path, base, family: str, sizes, n, budget, tile_px: int):
    """Rows for ComfyUI-TiledDiffusion's MultiDiffusion (tile tile_px, overlap tile_px / 12, batch 4)."""
    spec = importlib.util.spec_from_file_location("tiled_diffusion_peer", checkout / "__init__.py",
                                                  submodule_search_locations=[str(checkout)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    node = package.NODE_CLASS_MAPPINGS["TiledDiffusion"]()
    sdpa = models.variant(None, base, None, "sdpa")
    overlap = max(8, tile_px // 96 * 8)
    model = node.apply(sdpa, "MultiDiffusion", tile_px, tile_px, overlap, 4)[0]
    models.sample(model, family, tile_px)      # warm-up: one whole tile (a smaller image leaves it no overlap)
    rows, last, device = [], None, models.device()
    for px in sizes:
        row = {"peer": f"MultiDiffusion (ComfyUI-TiledDiffusion), tile {tile_px} px", "family": family, "px": px}
        skip = budget.refuse(predict(last, px * px, 1), n(px))
        if skip:
            rows.append({**row, **skip})
            continue
        row.update(measure(lambda: models.sample(model, family, px), device, n(px), warmup=False))
        last = (px * px, row["median_s"])
        rows.append(row)
    return rows


def run(paths: dict, base, weights, family, sizes, n, budget, quick) -> list[dict]:
    """paths: peer name -> checkout or None (TiledDiffusion: then the snapshot in THIRD_PARTY_DIR); n(px): runs
    per size. A missing checkout gives a row that says so."""
    rows = []
    for name, path in paths.items():
        if not path and name in SNAPSHOTS:
            path = snapshot_checkout(name)
            if path:
                log.info("[LinFusion] bench peer %s: the snapshot %s (commit %s)", name, path, snapshot_commit(name))
        if not path:
            where = f" or {THIRD_PARTY_DIR / (SNAPSHOTS[name] + '.tar.gz')}" if name in SNAPSHOTS else ""
            rows.append({"peer": name, "skipped": f"no checkout given (--{name.replace('_', '-')} PATH){where}"})
            continue
        try:
            if name == "official_linfusion":
                rows += official_linfusion(Path(path), base, weights, family, sizes, n, budget, quick)
            else:
                rows += multidiffusion(Path(path), base, family, sizes, n, budget, 64 if quick else 768)
        except Exception as e:        # a peer's checkout that does not run is reported, not fatal
            log.exception("[LinFusion] bench peer %s failed", name)
            rows.append({"peer": name, "skipped": f"failed: {type(e).__name__}: {str(e)[:160]}"})
    return rows

"""Peak memory and time of one UNet evaluation, tiled (exact mode) vs untiled, against resolution.

    python3 scripts/comfy_host.py python bench/tiled_unet.py [--width 64] [--sizes 64,128,192,256] [--tile 32]

Each measurement runs in its own process: the model is built first, freed heap is returned to the OS and
the resident size read, then one warm-up and `--repeat` timed UNet evaluations run; the peak extra memory
is the peak RSS during them (1 ms poller + kernel high-water mark) minus that baseline. Model: the SD1.5 UNet structure
(4 levels, 2 res blocks, transformers on the first 3 levels and the middle, conv proj_in/out) at a
reduced width (`--width`, 320 in SD1.5) with LinFusion self-attention on every transformer block, random
weights, fp32, batch 1. On a CPU-only machine the park device and the compute device are the same memory,
so "tiled" peak = parked full-size activations (skip connections, block outputs) + a tile-bounded working
set; the parked part is printed too.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident size during a block: max of a 1 ms poller and the kernel's high-water mark (when that
    rose during the block). Freed heap is handed back first (malloc_trim) so the baseline is honest."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base, self.peak, self.done = rss_bytes(), 0, False
        self.hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if hwm > self.hwm_before:
            self.peak = max(self.peak, hwm)
        self.extra = max(self.peak - self.base, 0)


def boot_comfy():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))


def sd15_config(width: int) -> dict:
    return dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, in_channels=4, model_channels=width, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                use_linear_in_transformer=False, context_dim=768, num_heads=8,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                use_temporal_attention=False, use_temporal_resblock=False)


def worker(args) -> dict:
    boot_comfy()
    import torch
    from test_tiled_unet import build_unet  # the tests' random-weight builder with LinFusion mounted
    from linfusion_core.module import LinFusionAttention
    from linfusion_core.tiled_unet import TiledUNetRunner

    torch.set_num_threads(args.threads)
    unet = build_unet(sd15_config(args.width), LinFusionAttention, 0)
    n = args.latent
    x = torch.randn(1, 4, n, n)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 768)
    # Skip connections the tiled mode must keep parked at once: every input block's output.
    parked = 0
    with torch.no_grad():
        h = n
        for i, blk in enumerate(unet.input_blocks):
            ch = [m for m in blk.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels
            if any(type(m).__name__ == "Downsample" for m in blk.children()):
                h = (h + 1) // 2
            parked += ch * h * h * 4
    times = []
    with torch.no_grad(), PeakRSS() as mem:
        for i in range(args.repeat + 1):
            t0 = time.perf_counter()
            if args.mode == "untiled":
                unet(x, t, ctx, transformer_options={})
            else:
                TiledUNetRunner(unet, args.tile, "cpu", "cpu", progress=False).forward(x, t, ctx, transformer_options={})
            times.append(time.perf_counter() - t0)
    return dict(mode=args.mode, latent=n, px=n * 8, tile=args.tile, width=args.width,
                time_s=min(times[1:]) if len(times) > 1 else times[0],
                peak_extra_mb=mem.extra / 2**20, skips_mb=parked / 2**20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", default="tiled")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--sizes", default="64,128,192,256")
    ap.add_argument("--tiles", default="", help="extra tiled runs at the largest size with these tile sizes")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-mb", type=float, default=1024.0)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = [(m, s, args.tile) for s in sizes for m in ("untiled", "tiled")]
    plan += [("tiled", sizes[-1], int(tl)) for tl in args.tiles.split(",") if tl]
    for mode, size, tile in plan:
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--latent", str(size), "--tile", str(tile),
               "--width", str(args.width), "--repeat", str(args.repeat), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"worker failed: {' '.join(cmd)}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['mode']:8s} {row['px']:5d}px tile {row['tile']:3d}: {row['time_s']:7.2f} s  "
              f"peak +{row['peak_extra_mb']:8.1f} MB  (skips {row['skips_mb']:.1f} MB)", flush=True)
    print("\n| image px | latent | untiled s | tiled s | time ratio | untiled peak MB | tiled peak MB | "
          "memory ratio | tiled peak - skips MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["mode"], r["latent"], r["tile"]): r for r in rows}
    for s in sizes:
        u, t = by[("untiled", s, args.tile)], by[("tiled", s, args.tile)]
        print(f"| {s * 8} | {s} | {u['time_s']:.2f} | {t['time_s']:.2f} | {t['time_s'] / u['time_s']:.2f} | "
              f"{u['peak_extra_mb']:.0f} | {t['peak_extra_mb']:.0f} | "
              f"{t['peak_extra_mb'] / u['peak_extra_mb']:.2f} | {t['peak_extra_mb'] - t['skips_mb']:.0f} |")
    # Largest size within the budget: peak is affine in pixel count for both modes; fit the two largest sizes.
    for mode in ("untiled", "tiled"):
        a, b = by[(mode, sizes[-2], args.tile)], by[(mode, sizes[-1], args.tile)]
        slope = (b["peak_extra_mb"] - a["peak_extra_mb"]) / (b["latent"] ** 2 - a["latent"] ** 2)
        icpt = b["peak_extra_mb"] - slope * b["latent"] ** 2
        side = ((args.budget_mb - icpt) / slope) ** 0.5 if slope > 0 else float("inf")
        print(f"{mode}: peak ~ {icpt:.0f} MB + {slope * 1e3:.2f} MB per 1000 latent px; largest square within "
              f"{args.budget_mb:.0f} MB ~ {int(side) * 8} px")
    if args.tiles:
        print("\nTile size at the largest size:")
        for tl in [args.tile] + [int(x) for x in args.tiles.split(",") if x]:
            r = by[("tiled", sizes[-1], tl)]
            print(f"  tile {tl}: {r['time_s']:.2f} s, peak +{r['peak_extra_mb']:.0f} MB")


if __name__ == "__main__":
    main()

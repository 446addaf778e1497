"""Time, peak memory and error of three VAE decodes, side by side, at growing image sizes:
untiled `VAE.decode`, ComfyUI's `VAE.decode_tiled` (the VAEDecodeTiled node) and LinFusion's exact tiled decode.

    python3 scripts/comfy_host.py python bench/tiled_vae.py [sizes in px ...] [--tile 256] [--no-doc]

The VAE is the full SD1.x/SDXL AutoencoderKL architecture with random variance-preserving weights, loaded
through comfy.sd.VAE. Peak memory: on CUDA torch's max_memory_allocated; on CPU the peak process RSS
above the level before the call (sampled every 2 ms; glibc is told to return large blocks to the OS so
the baseline does not drift). Errors are max |x - untiled| on the [0, 1] image. The table is written into
docs/tiled_vae.md between the bench markers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:      # RSS must fall when tensors are freed
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
DOC = REPO / "docs" / "tiled_vae.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


class PeakMemory:
    """Peak memory above the starting level during a `with` block."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.max_rss = self.base
        self.stop = threading.Event()

        def poll():
            while not self.stop.is_set():
                self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
                time.sleep(0.002)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.max_rss, self.proc.memory_info().rss) - self.base
        return False


def measure(fn, device):
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", nargs="*", type=int, default=[256, 512, 768, 1024])
    parser.add_argument("--tile", type=int, default=256, help="tile side in px for both tiled decodes")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    from comfy_harness import get_host
    from conftest import MODEL_ROOT
    from random_vae import SD_DDCONFIG, load_vae, random_vae_state_dict

    host = get_host(MODEL_ROOT)
    tv = importlib.import_module(host.extension_module.__name__ + ".linfusion_core.tiled_vae")
    vae = load_vae(random_vae_state_dict(SD_DDCONFIG, seed=0))
    device = torch.device(vae.device)
    overlap = args.tile // 4
    rows = []
    for size in args.sizes:
        latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
        ref, t_ref, m_ref = measure(lambda: vae.decode(latent), device)
        comfy, t_comfy, m_comfy = measure(
            lambda: vae.decode_tiled(latent, tile_x=args.tile // 8, tile_y=args.tile // 8, overlap=overlap // 8), device)
        ours, t_ours, m_ours = measure(lambda: tv.decode(vae, latent, tile_size=args.tile, park="cpu"), device)
        err_comfy = (comfy.float() - ref.float()).abs().max().item()
        err_ours = (ours.float() - ref.float()).abs().max().item()
        rows.append((size, t_ref, m_ref, t_comfy, m_comfy, err_comfy, t_ours, m_ours, err_ours))
        print(f"{size}px: untiled {t_ref:.1f}s {m_ref / 2**20:.0f}MiB | ComfyUI tiled {t_comfy:.1f}s "
              f"{m_comfy / 2**20:.0f}MiB err {err_comfy:.3g} | LinFusion {t_ours:.1f}s {m_ours / 2**20:.0f}MiB "
              f"err {err_ours:.3g}", flush=True)
        del ref, comfy, ours

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    mem_kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS increase"
    table = [f"Device: {where}, VAE dtype {vae.vae_dtype}, tile {args.tile} px (ComfyUI overlap {overlap} px), "
             f"LinFusion activations parked on CPU. Memory: {mem_kind}. Error: max |x - untiled| on the [0, 1] image.",
             "",
             "| size | untiled s | untiled MiB | ComfyUI tiled s | ComfyUI tiled MiB | ComfyUI tiled err "
             "| LinFusion s | LinFusion MiB | LinFusion err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, t_ref, m_ref, t_c, m_c, e_c, t_o, m_o, e_o in rows:
        table.append(f"| {size}x{size} | {t_ref:.1f} | {m_ref / 2**20:.0f} | {t_c:.1f} | {m_c / 2**20:.0f} | {e_c:.3f} "
                     f"| {t_o:.1f} | {m_o / 2**20:.0f} | {e_o:.1e} |")
    text = "\n".join(table)
    print(text)
    if not args.no_doc and DOC.exists():
        doc = DOC.read_text()
        block = f"{MARK_START}\n{text}\n{MARK_END}"
        doc = re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda _: block, doc, flags=re.S)
        DOC.write_text(doc)


if __name__ == "__main__":
    main()

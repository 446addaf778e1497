"""What the benchmarks ran on, and the machine's measured matmul throughput (the yardstick for FLOP/s)."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

from .measure import measure


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def describe(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round((total_ram_bytes() or 0) / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": str(device),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.1f}",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    return info


def code_version(repo: Path) -> str:
    """The git commit of the checkout, else a hash of linfusion_core's sources (what was measured)."""
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "linfusion_core",
                                    "nodes", "bench"], capture_output=True, text=True, timeout=10).stdout
            return rev.stdout.strip() + (" + local changes" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for f in sorted((repo / "linfusion_core").glob("*.py")):
        digest.update(f.read_bytes())
    return "linfusion_core sha256 " + digest.hexdigest()[:12]


def gemm_peak_flops(device: torch.device, dtype=torch.float32, quick: bool = False) -> dict:
    """Best median FLOP/s over a square GEMM and the tall-skinny shapes of a transformer's linear layers.

    Shapes are (M x K) @ (K x N); the tall ones are 2 x 16384 tokens through SD1.5's 320/1280-wide layers.
    """
    sizes = [(2048, 2048, 2048)] if quick else [(4096, 4096, 4096), (32768, 320, 320), (8192, 1280, 1280)]
    if device.type == "cuda":
        sizes = [(8192, 8192, 8192), (32768, 1280, 1280)]
    shapes = {}
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        res = measure(lambda: a @ b, device, max_repeats=5, budget_s=2.0 if quick else 6.0)
        shapes[f"{m}x{k}x{n}"] = 2.0 * m * k * n / res.median_s
        del a, b
    best = max(shapes, key=shapes.get)
    return {"peak_flops": shapes[best], "best_shape": best, "by_shape": shapes, "dtype": str(dtype)}

"""The one place that times and measures peak memory; every number on the benchmark page comes from here.

Time: wall clock around each call, with torch.cuda.synchronize before and after on a GPU, and the CPU time
this process spent in it (all its threads: torch's intra-op threads too), which other processes on a shared
machine inflate far less than the wall clock. Variants compared at one size run interleaved (`interleaved`:
A B, B A, A B, ... after one warm-up call of each at that size), so drift of the machine (thermal, other
work, allocator growth) lands on every variant alike instead of on the one that ran last. Peak memory: on
CUDA torch.cuda.max_memory_allocated minus the allocation before the calls; on CPU the process's resident
high-water mark (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus the resident set
before them, which sees everything torch allocates.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory a block allocates beyond what was allocated before it (bytes; None where unknown)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        gc.collect()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        if _LIBC is not None:
            _LIBC.malloc_trim(0)       # freed heap back to the OS, so it cannot hide a new allocation
        try:
            Path("/proc/self/clear_refs").write_text("5")      # VmHWM := VmRSS
            self.base = _status_bytes("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = max(0, (_status_bytes("VmHWM") or self.base) - self.base)
        return False


@torch.inference_mode()
def measure(fn, device: torch.device, n: int, warmup: bool = True, keep: bool = False) -> dict:
    """Exactly n timed calls of fn (after one untimed warm-up unless warmup is False): times, median, peak;
    with keep, the last call's result too (under "output")."""
    if warmup:
        fn()
    times, cpu = [], []
    with PeakMemory(device) as mem:
        for _ in range(n):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if not keep:
                del out
    res = {"times_s": times, "median_s": statistics.median(times), "cpu_s": cpu, "n": n, "peak_bytes": mem.peak}
    return dict(res, output=out) if keep else res


@torch.inference_mode()
def interleaved(fns: dict, device: torch.device, n: int, parts: dict | None = None, warmup: bool = True) -> dict:
    """n timed calls of every variant in fns (name -> fn), interleaved: round r runs the variants in turn,
    the order reversed every other round (A B, B A, ...), so a slow drift costs every variant alike. Before
    the rounds each variant runs once untimed at this very size (allocator growth, caches, lazy set-up).

    Returns name -> {times_s, cpu_s, median_s, n, peak_bytes}; with parts (name -> modules, see PartClock)
    also, per run, "<part>_times_s" / "<part>_cpu_s" (wall / process CPU seconds inside the part) and
    "outside_times_s" / "outside_cpu_s" (the rest of the call). peak_bytes is each variant's peak over its
    own calls (on a CPU the resident high-water mark, taken per call)."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    res = {name: {"times_s": [], "cpu_s": [], "peaks": []} for name in names}
    for r in range(n):
        for name in (names if r % 2 == 0 else names[::-1]):
            row = res[name]
            with PeakMemory(device) as mem, PartClock(device, parts or {}) as clock:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = fns[name]()
                sync(device)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            del out
            row["times_s"].append(wall)
            row["cpu_s"].append(cpu)
            row["peaks"].append(mem.peak)
            for part in parts or {}:
                row.setdefault(f"{part}_times_s", []).append(clock.seconds[part])
                row.setdefault(f"{part}_cpu_s", []).append(clock.cpu_seconds[part])
            if parts:
                row.setdefault("outside_times_s", []).append(wall - sum(clock.seconds.values()))
                row.setdefault("outside_cpu_s", []).append(cpu - sum(clock.cpu_seconds.values()))
    for row in res.values():
        peaks = [p for p in row.pop("peaks") if p is not None]
        row.update(median_s=statistics.median(row["times_s"]), n=n, peak_bytes=max(peaks) if peaks else None)
    return res


def spread(values: list[float]) -> dict:
    """median, min and max of a list of per-run values (the page prints median (min-max), n)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class PartClock:
    """Seconds spent inside given modules while the block runs (outermost part only, no double counting):
    wall clock (`seconds`) and this process's CPU time (`cpu_seconds`).

    parts maps a part name to modules; forward hooks on every module find them by identity.
    """

    def __init__(self, device: torch.device, parts: dict[str, list]):
        self.device = device
        self.owner = {id(m): name for name, mods in parts.items() for m in mods}
        self.seconds = dict.fromkeys(parts, 0.0)
        self.cpu_seconds = dict.fromkeys(parts, 0.0)
        self.stack = []

    def _pre(self, module, args):
        if id(module) in self.owner and not self.stack:
            sync(self.device)
            self.stack.append((module, time.perf_counter(), time.process_time()))

    def _post(self, module, args, out):
        if self.stack and self.stack[-1][0] is module:
            sync(self.device)
            _, t0, c0 = self.stack.pop()
            self.seconds[self.owner[id(module)]] += time.perf_counter() - t0
            self.cpu_seconds[self.owner[id(module)]] += time.process_time() - c0

    def __enter__(self):
        if not self.owner:
            self.handles = []
            return self
        hooks = torch.nn.modules.module
        self.handles = [hooks.register_module_forward_pre_hook(self._pre), hooks.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


class Budget:
    """The run's time budget: a measurement predicted to overrun what is left is skipped, not guessed."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def refuse(self, predicted_s: float | None, n: int, limit_s: float | None = None) -> dict | None:
        """A `skipped` row when n calls of predicted_s seconds do not fit; None when they do."""
        if self.left() <= 0:
            return {"skipped": "time budget spent", "predicted_s": predicted_s}
        if predicted_s is None:
            return None
        if limit_s is not None and predicted_s > limit_s:
            return {"skipped": f"one call predicted {predicted_s:.0f} s > {limit_s:.0f} s limit", "predicted_s": predicted_s}
        if predicted_s * n > self.left():
            return {"skipped": f"{n} x {predicted_s:.0f} s predicted > {self.left():.0f} s of budget left",
                    "predicted_s": predicted_s}
        return None


def predict(last: tuple | None, size: float, exponent: float) -> float | None:
    """Power-law extrapolation from the last measurement (size, seconds) of the same thing."""
    return None if last is None else last[1] * (size / last[0]) ** exponent


def gemm_peak_flops(device: torch.device, dtype=torch.float32, quick: bool = False) -> float:
    """Best median FLOP/s of a square GEMM and the tall-skinny shapes of SD1.5's linear layers."""
    shapes = [(1024, 1024, 1024)] if quick else [(4096, 4096, 4096), (32768, 320, 320), (8192, 1280, 1280)]
    if device.type == "cuda":
        shapes = [(8192, 8192, 8192), (65536, 320, 320), (32768, 1280, 1280)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        best = max(best, 2.0 * m * k * n / measure(lambda: a @ b, device, 3)["median_s"])
    return best


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


class OtherWork:
    """How many cores other processes kept busy while this one ran, on average: all CPU time the machine
    spent (/proc/stat) minus this process's own and its finished children's (a benchmark's own rank processes
    are its work, not other work; read it after they were waited for). Unlike the load average it does not
    count this run, nor the tail of the run just before it."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait
        own = os.times()
        return time.time(), busy, own.user + own.system + own.children_user + own.children_system

    def cores(self) -> float | None:
        end = self._now()
        if self.start is None or end is None or end[0] - self.start[0] < 1:
            return None
        return round(max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / (end[0] - self.start[0]), 2)


def machine(device: torch.device, repo: Path) -> dict:
    """What ran the benchmark, the commit measured, and the 1-minute load average at the start."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_start": load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()
    info["commit"] = git("rev-parse", "--short", "HEAD") or "not a git checkout"
    if git("status", "--porcelain", "--", "linfusion_core", "nodes", "bench"):
        info["commit"] += " + local changes"
    return info

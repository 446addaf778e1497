"""Time and peak-memory measurement of one callable, on CPU or CUDA, with medians over repeats.

CPU peak memory is the process's resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs) minus the resident set just before the call: it sees everything torch and its
libraries allocate, which tracemalloc does not. Freed heap memory is handed back to the OS first
(malloc_trim) so that it cannot be reused silently and hide an allocation. On CUDA the numbers come
from CUDA events and torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Measurement:
    times_s: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None     # high-water of memory allocated by the call, beyond its inputs

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def as_dict(self) -> dict:
        return {"times_s": self.times_s, "median_s": self.median_s, "peak_extra_bytes": self.peak_extra_bytes}


@dataclass
class Skipped:
    reason: str
    predicted_s: float | None = None        # what the measurement was expected to take, when known

    def as_dict(self) -> dict:
        return {"skipped": self.reason, "predicted_s": self.predicted_s}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class CpuPeakMemory:
    """Resident-set growth during a block (bytes), or None where Linux's counters are not available."""

    def __enter__(self):
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")          # resets VmHWM to the current resident set
            self.base = _proc_status_bytes("VmRSS")
        except OSError:
            self.base = None
        self.peak_extra = None
        return self

    def __exit__(self, *exc):
        hwm = _proc_status_bytes("VmHWM")
        if self.base is not None and hwm is not None:
            self.peak_extra = max(0, hwm - self.base)
        return False


class CudaPeakMemory:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        self.peak_extra = None
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak_extra = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        del out
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


@torch.inference_mode()
def measure(fn: Callable[[], object], device: torch.device, *, max_repeats: int = 5,
            budget_s: float = 10.0, warmup: bool = True) -> Measurement:
    """Median-ready timings of fn(): repeats until max_repeats or until budget_s is spent (at least one).

    The first timed call also records the peak extra memory. A warm-up call (not timed) runs first unless
    warmup is False; big calls skip it because their one-off costs are a negligible share.
    """
    if warmup:
        _timed_call(fn, device)
    result = Measurement()
    tracker = CudaPeakMemory(device) if device.type == "cuda" else CpuPeakMemory()
    with tracker:
        result.times_s.append(_timed_call(fn, device))
    result.peak_extra_bytes = tracker.peak_extra
    while len(result.times_s) < max_repeats and sum(result.times_s) + result.times_s[-1] <= budget_s:
        result.times_s.append(_timed_call(fn, device))
    return result

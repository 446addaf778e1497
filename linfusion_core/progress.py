"""One progress bar per job: a long node (the high-res ladder) owns one ComfyUI bar, and the work nested in it
(tiled UNet calls, tiled VAE passes, an upscale model) reports fractions into it instead of opening bars of
their own, which would all draw on the same node with different totals.

A job counts its work in units (one sampling step, one VAE pass); the bar's total is fixed when the job
starts (units x RESOLUTION) and its value never goes back. Nested work reports "fraction of the unit now
running"; the job owner commits whole units (`advance_to`, or `unit()` around a nested call).
With no job active, nested work keeps a bar of its own, as a standalone node does.
Every report checks for the user's cancel, so work that reports per tile stops within one tile.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

RESOLUTION = 100      # bar ticks per unit: enough for per-tile movement within a step
_current: ContextVar[Optional["Job"]] = ContextVar("linfusion_progress_job", default=None)


def _check_interrupt() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


class Job:
    """A bar of `units` units. position: units committed so far; span: length of the unit(s) now running."""

    def __init__(self, units: float, parent: Optional["Job"] = None):
        import comfy.utils

        self.units = max(float(units), 1e-9)
        self.total = max(1, int(round(self.units * RESOLUTION)))
        self.value = 0
        self.position = 0.0
        self.span = 1.0
        self.parent = parent
        # A job started inside another maps itself into the outer job's running unit (one bar still).
        self.bar = None if parent is not None else comfy.utils.ProgressBar(self.total)

    def _show(self, units_done: float) -> None:
        value = min(self.total, int(units_done * RESOLUTION))
        if value > self.value:
            self.value = value
            if self.parent is not None:
                self.parent.report(value / self.total)
            else:
                self.bar.update_absolute(value, self.total)
        _check_interrupt()

    def advance_to(self, position: float) -> None:
        """Commit the work up to `position` units; the next unit starts there."""
        self.position = max(self.position, min(float(position), self.units))
        self.span = 1.0
        self._show(self.position)

    def report(self, fraction: float) -> None:
        """Nested work: `fraction` (0..1) of the running unit(s) is done. Kept just below the unit's end, which
        only the owner commits (a step may call the UNet more than once)."""
        fraction = min(max(float(fraction), 0.0), 0.99)
        self._show(self.position + self.span * fraction)

    @contextmanager
    def unit(self, units: float = 1.0):
        """Run nested work as the next `units` units; they are committed when it returns."""
        start = self.position
        self.span = float(units)
        yield self
        self.advance_to(start + units)

    def finish(self) -> None:
        self.position = self.units
        self._show(self.units)


def current() -> Optional[Job]:
    return _current.get()


@contextmanager
def job(units: float):
    """A job of `units` units for the code inside; nested work reports into it. Reaches its total on success."""
    j = Job(units, parent=current())
    token = _current.set(j)
    try:
        yield j
        j.finish()
    finally:
        _current.reset(token)


def one_bar(units_of):
    """Decorator: the function runs as one job of units_of(*args, **kwargs) units."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with job(units_of(*args, **kwargs)):
                return fn(*args, **kwargs)
        return run
    return wrap


@contextmanager
def unit(units: float = 1.0):
    """The nested call inside counts as `units` units of the current job (nothing when no job runs)."""
    j = current()
    if j is None:
        yield None
        return
    with j.unit(units):
        yield j


class NestedBar:
    """Progress of one nested piece of work (tiles of a pass): into the running job's unit when there is one,
    else a ComfyUI bar of its own. `total` may be unknown (None) on the first call at a new size: then only
    a standalone bar moves (capped at 1, as before), a job's bar waits for its owner's commit."""

    def __init__(self, total: Optional[int] = None):
        self.job = current()
        self.total = total
        self.done = 0
        self.bar = None

    def update_absolute(self, done: int, total: Optional[int] = None) -> None:
        import comfy.utils

        if total:
            self.total = total
        self.done = done
        if self.job is not None:
            if self.total:
                self.job.report(done / self.total)
            else:
                _check_interrupt()
            return
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(self.total or 1)
        bar_total = self.total or self.bar.total
        self.bar.update_absolute(min(done, bar_total), bar_total)

    def update(self, n: int = 1) -> None:
        """As comfy.utils.ProgressBar.update (what comfy.utils.tiled_scale calls per tile)."""
        self.update_absolute(self.done + n)

    def __call__(self, done: int, total: int) -> None:
        """As an on_progress(done, total) callback."""
        self.update_absolute(done, total)

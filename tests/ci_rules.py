"""Under CI (CI=true) nothing skips: a missing browser or file there is a broken CI image, not a reason to
pass quietly. Locally a skip stays a skip, with its message (pytest -ra prints it).

`skip_or_fail` is for tests and fixtures that check a requirement themselves; the two hooks (registered by
conftest.py) turn any other skip into a failure under CI (a module-level skip then fails collection, which
stops the run: loud, but prefer skip_or_fail in a fixture).

The one skip CI lets stand: `skip_for_host_difference`, for a test that cannot apply to the ComfyUI it runs on
(CI runs every test on two). It must name the difference in words README.md states, so a user reads about
every such difference there; a skip naming anything else fails under CI like any other."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HOST_DIFFERENCE = "not on this ComfyUI, because (README.md): "


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Inside a test or fixture: skip locally, fail under CI. (A module-level check should skip only when not
    under_ci() and leave the failing to a fixture: a failed collection would stop the whole CI run.)"""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def skip_for_host_difference(difference: str) -> None:
    """Inside a test: it cannot apply to this host because of `difference`, a phrase README.md states."""
    pytest.skip(HOST_DIFFERENCE + difference)


def _words(text: str) -> str:
    return " ".join(text.split())


def stated_host_difference(reason: str) -> bool:
    """A skip from skip_for_host_difference whose difference README.md states (line breaks aside)."""
    return reason.startswith(HOST_DIFFERENCE) and \
        _words(reason[len(HOST_DIFFERENCE):]) in _words(README.read_text(encoding="utf-8"))


def _fail_if_skipped(report) -> None:
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if stated_host_difference(reason):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())

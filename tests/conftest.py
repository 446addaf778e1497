"""Session fixtures: one real ComfyUI host per test run (see comfy_harness.py)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_harness import get_host  # noqa: E402
from ci_rules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (CI: no skips)

# The generated model files, one cache for both hosts (scripts/comfy_host.py sets it; see fixture_models.py).
MODEL_ROOT = Path(os.environ.get("LINFUSION_FIXTURES_DIR")
                  or Path(os.environ.get("LINFUSION_HOST_DIR", Path(__file__).resolve().parent.parent / ".host"))
                  / "fixtures")


@pytest.fixture(scope="session")
def host():
    """The running ComfyUI host with this extension loaded by ComfyUI's own loader."""
    return get_host(MODEL_ROOT)


@pytest.fixture(scope="session")
def core(host):
    """linfusion_core as ComfyUI loaded it (the same module objects the nodes use)."""
    return host.import_core()


@pytest.fixture(scope="session")
def fixtures(host):
    """Deterministic random-weight model files (see fixture_models.FixtureModels for the names).

    Each family's files are generated on first use and cached under MODEL_ROOT, so a run that only
    touches SD 1.5 never builds the SDXL checkpoint.
    """
    from fixture_models import FixtureModels

    return FixtureModels(MODEL_ROOT)


# The high-resolution tests' tiny real models (tests/highres_models.py), the ladder's core module, a tiny VAE.
@pytest.fixture(scope="session")
def hm(host):
    import highres_models
    return highres_models


@pytest.fixture(scope="session")
def pu(core):
    return importlib.import_module(core.__name__ + ".highres.progressive_upscale")


@pytest.fixture(scope="session")
def vae(hm):
    return hm.tiny_vae()


@pytest.fixture
def every_progress_update(host, monkeypatch):
    """ComfyUI 0.33's ProgressBar sends an update on only when it is >= 100 ms and 0.5 % after the last one sent
    (the first and the final one always go); 0.3.75 sends every one. Tests that look at the updates the
    extension makes (per tile, per step) turn that throttle off where the host has it."""
    import comfy.utils
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            monkeypatch.setattr(comfy.utils, name, 0)

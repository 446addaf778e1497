"""The real third-party node packs users run beside this extension, loaded into the test host for the session.

The packs are source snapshots (tarballs with one top folder each, commits in ORIGIN.txt) in
`../shared/third_party/` beside the checkout (`LINFUSION_THIRD_PARTY_DIR` overrides), which only this project's own
checkouts and CI have: where a snapshot is missing, the test that needs it skips saying so (under CI=true it
fails, tests/ci_rules.py). `load_pack(name)`
unpacks one into the host's temporary custom_nodes folder (the one tests/comfy_harness.py made for this
session) and imports it with ComfyUI's own custom-node loader (`nodes.load_custom_node`), as a start-up
would. Nothing of the packs is copied into this project, and the copies vanish with the session's temp dir.

A pack that is there but does not import on this host raises PackNotLoaded with ComfyUI's own traceback; `require_pack`
turns that into a test failure (never a skip: a pack that stopped loading is exactly what these tests are
for). A pack that is known not to load on a host is declared in KNOWN_NOT_LOADING with the reason, and a test
checks that the failure is that one.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ci_rules import skip_or_fail
from scratch import unpack_tar

REPO = Path(__file__).resolve().parent.parent
THIRD_PARTY_DIR = Path(os.environ.get("LINFUSION_THIRD_PARTY_DIR", REPO.parent / "shared" / "third_party"))

IPADAPTER = "ComfyUI_IPAdapter_plus"
ADVANCED_CONTROLNET = "ComfyUI-Advanced-ControlNet"
ANIMATEDIFF = "ComfyUI-AnimateDiff-Evolved"
ULTIMATE_SD_UPSCALE = "ComfyUI_UltimateSDUpscale"
TILED_DIFFUSION = "ComfyUI-TiledDiffusion"
PACKS = (IPADAPTER, ADVANCED_CONTROLNET, ANIMATEDIFF, ULTIMATE_SD_UPSCALE, TILED_DIFFUSION)


class PackNotLoaded(RuntimeError):
    """ComfyUI's loader could not import the pack; the message holds its traceback."""


@dataclass
class LoadedPack:
    name: str
    path: Path
    module: object
    node_types: tuple[str, ...]     # the node types this pack registered


def require_snapshot(path: Path) -> Path:
    """In a test or fixture: `path` in the snapshots folder, or a skip that says where it was looked for (a failure
    under CI=true, whose checkout always has it)."""
    if not path.is_file():
        skip_or_fail(f"{path} is missing: the third-party pack snapshots are in ../shared/third_party/ beside this "
                     f"project's own checkouts (or where LINFUSION_THIRD_PARTY_DIR says), not in a clone")
    return path


def origin() -> dict[str, str]:
    """pack folder -> 'commit date' from ORIGIN.txt."""
    out = {}
    for line in require_snapshot(THIRD_PARTY_DIR / "ORIGIN.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[parts[0]] = f"{parts[1]} {parts[2]}"
    return out


def _custom_nodes_dir() -> Path:
    """The temporary custom_nodes folder of this session's host (the one that holds our checkout's link)."""
    import folder_paths
    return Path(folder_paths.get_folder_paths("custom_nodes")[0])


_LOADED: dict[str, LoadedPack | PackNotLoaded] = {}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def load_pack(name: str) -> LoadedPack:
    """Unpack `name` into the host's custom_nodes and load it with ComfyUI's loader (once per session)."""
    if name not in _LOADED:
        _LOADED[name] = _load(name)
    result = _LOADED[name]
    if isinstance(result, PackNotLoaded):
        raise result
    return result


def unpack(name: str, target: Path) -> Path:
    """The pack's snapshot unpacked into `target` (a custom_nodes folder of this session); its folder."""
    unpack_tar(require_snapshot(THIRD_PARTY_DIR / f"{name}.tar.gz"), target)
    return target / name


def _load(name: str) -> LoadedPack | PackNotLoaded:
    import nodes

    path = unpack(name, _custom_nodes_dir())
    before = set(nodes.NODE_CLASS_MAPPINGS)
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(path), module_parent="custom_nodes"))
    finally:
        root.removeHandler(records)
    if not ok:
        return PackNotLoaded(f"{name} does not import on this ComfyUI ({_host_version()}):\n" + "\n".join(records.lines))
    import sys
    module = sys.modules[str(path).replace(".", "_x_")]
    return LoadedPack(name, path, module, tuple(sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)))


def _host_version() -> str:
    import comfyui_version
    return comfyui_version.__version__


def require_pack(name: str) -> LoadedPack:
    """In a test or fixture: the loaded pack, or a failure with the import error (under CI and locally alike);
    a skip where its snapshot is missing (a failure under CI)."""
    try:
        return load_pack(name)
    except PackNotLoaded as e:
        pytest.fail(str(e), pytrace=False)


def add_model_folder(kind: str, path: Path) -> None:
    """A fixture folder for a model kind (a pack's own kind once the pack registered it)."""
    import folder_paths
    path.mkdir(parents=True, exist_ok=True)
    if str(path) not in folder_paths.get_folder_paths(kind):
        folder_paths.add_model_folder_path(kind, str(path))


def ipadapter_with_models(fixtures, model_root: Path) -> LoadedPack:
    """ComfyUI_IPAdapter_plus loaded, with the PLUS preset's two files (random weights) where it finds them."""
    from pack_models import PackModels
    pack = require_pack(IPADAPTER)
    models = PackModels(model_root, fixtures)
    models.clip_vision_h()
    models.ipadapter_plus_sd15(pack.module)
    add_model_folder("ipadapter", models.folder("ipadapter"))
    add_model_folder("clip_vision", models.folder("clip_vision"))
    return pack


class PackCalls:
    """Records `record(args)` of every call of a method, a pack's or our engine's (a spy: the method still runs)."""

    def __init__(self, cls, method: str, record):
        self.cls, self.method, self.record, self.calls = cls, method, record, []

    def __enter__(self):
        original = self.original = getattr(self.cls, self.method)

        def spy(obj, *args, **kwargs):
            self.calls.append(self.record(*args, **kwargs))
            return original(obj, *args, **kwargs)
        setattr(self.cls, self.method, spy)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.method, self.original)
        return False


def ipadapter_patch_calls(pack: LoadedPack) -> PackCalls:
    """Spy on the pack's cross-attention replacement (CrossAttentionPatch.Attn2Replace): (block, cond_or_uncond)."""
    import sys
    cls = sys.modules[pack.module.__name__ + ".CrossAttentionPatch"].Attn2Replace
    return PackCalls(cls, "__call__", lambda q, k, v, extra: (tuple(extra["block"]), tuple(extra["cond_or_uncond"])))


def python_module(name: str) -> str:
    """The `python_module` ComfyUI gives a pack's nodes in /object_info."""
    return f"custom_nodes.{name}"


# The ComfyUI_IPAdapter_plus node types example workflow 5 uses.
WORKFLOW_5_PACK_NODES = ("IPAdapterModelLoader", "IPAdapterAdvanced")


# Packs known not to load on a host version, with what ComfyUI's loader reports and why. Their feature tests
# are not collected there; test_known_load_failures checks that the failure is still exactly this one.
KNOWN_NOT_LOADING = {
    (ADVANCED_CONTROLNET, "0.3.75"): (
        "Ids must be unique between inputs and outputs",
        "its nodes are V3 nodes (comfy_entrypoint, comfy_api io.Schema); Apply Advanced ControlNet names an input "
        "and an output alike (positive, negative), which 0.3.75's comfy_api rejects, so none of its nodes register"),
}


def host_version_from_env() -> str:
    """The ComfyUI version at COMFYUI_PATH, read without importing it (usable at collection time)."""
    import re
    text = (Path(os.environ.get("COMFYUI_PATH", ".")) / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def loads_here(name: str) -> bool:
    return (name, host_version_from_env()) not in KNOWN_NOT_LOADING

"""The released LinFusion weights, fetched from the Hugging Face hub into `<root>/<name>/` (the hub folder
layout the loader reads) when a prompt asks for a set that is not on disk.

Nothing reaches the network at import time. The transfer is huggingface_hub's (ComfyUI brings it with
transformers); the files land in a hidden staging folder beside the final one, are checked with the
loader's own checks (a readable safetensors whose keys and shapes agree with config.json, for the
expected model family) and only then is the staging folder renamed to its final name: a half, cancelled
or corrupt download is never listed or loaded. An existing folder is never touched.
HF_ENDPOINT (mirrors), HF_TOKEN and HF_HUB_OFFLINE are read when the download runs.
"""
from __future__ import annotations

import glob
import inspect
import os
import shutil
from typing import Callable

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, LinFusionLoadError, families_compatible, peek_linfusion

# Released set -> the model family it was distilled for (LINFUSION_FACTS.md section 3).
RELEASES = {"LinFusion-1-5": "SD1.x", "LinFusion-2-1": "SD2.x", "LinFusion-XL": "SDXL"}
HUB_OWNER = "Yuanshi"
FILES = (CONFIG_FILE, WEIGHTS_FILE)    # small file first: a wrong endpoint fails before the big transfer
DOWNLOAD_MARK = " (download)"          # how earlier versions listed a set not on disk; saved values still load
DEFAULT_ENDPOINT = "https://huggingface.co"
_STAGING = ".{name}.download"          # hidden: model folder listings skip it


class HubDownloadError(RuntimeError):
    """A released set could not be fetched; the message says what to do instead."""


def release_name(choice: str) -> str | None:
    """The released set a node choice names ('LinFusion-1-5' or 'LinFusion-1-5 (download)'), else None."""
    name = choice[: -len(DOWNLOAD_MARK)] if choice.endswith(DOWNLOAD_MARK) else choice
    return name if name in RELEASES else None


def release_for_family(family: str) -> str | None:
    return next((name for name, fam in RELEASES.items() if fam == family), None)


def repo_id(name: str) -> str:
    return f"{HUB_OWNER}/{name}"


def hub_endpoint() -> str:
    """The hub (or mirror) to use, read now: huggingface_hub reads HF_ENDPOINT once, at its import."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def manual_steps(name: str, folder: str) -> str:
    return (f"To install it by hand, download {' and '.join(FILES)} of {repo_id(name)} "
            f"({hub_endpoint()}/{repo_id(name)}/tree/main) into the folder {folder}")


def download_release(name: str, root: str, *, progress: Callable[[int, int], None] | None = None,
                     check_interrupt: Callable[[], None] | None = None) -> str:
    """Fetch released set `name` into `root/name` and return that folder. An existing folder is returned
    untouched. `progress(done_bytes, total_bytes)` reports the transfer; `check_interrupt()` raises to
    cancel it (between chunks): what was fetched so far stays in the staging folder, never in `root/name`."""
    if name not in RELEASES:
        raise ValueError(f"'{name}' is not a released LinFusion set ({', '.join(RELEASES)})")
    final = os.path.join(root, name)
    if os.path.exists(final):
        return final
    repo = repo_id(name)
    if hub_offline():
        raise HubDownloadError(f"[LinFusion] {name} is not in {root} and HF_HUB_OFFLINE is set, so it is not "
                               f"downloaded from {repo}. {manual_steps(name, final)}")
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubDownloadError(f"[LinFusion] {name} is not in {root} and huggingface_hub (which ComfyUI installs "
                               f"with transformers) is missing. {manual_steps(name, final)}") from e

    endpoint = hub_endpoint()
    commit, sizes = _file_info(huggingface_hub, name, final, endpoint)
    staging = os.path.join(root, _STAGING.format(name=name))
    os.makedirs(staging, exist_ok=True)
    # A process killed mid-transfer leaves huggingface_hub's partial files behind; they are never resumed.
    for stale in glob.glob(os.path.join(staging, ".cache", "huggingface", "download", "**", "*.incomplete"),
                           recursive=True):
        os.remove(stale)

    counter = _ByteCounter(sum(sizes.values()), progress, check_interrupt)
    # tqdm_class gives byte progress (newer huggingface_hub); older ones download without it.
    kwargs = {"revision": commit, "local_dir": staging,
              **_accepted(huggingface_hub.hf_hub_download, endpoint=endpoint, tqdm_class=counter.tqdm_class())}
    for filename in FILES:
        if check_interrupt is not None:
            check_interrupt()
        try:
            huggingface_hub.hf_hub_download(repo, filename, **kwargs)
        except Exception as e:
            if _is_interrupt(e):
                raise
            raise HubDownloadError(f"[LinFusion] downloading {filename} of {repo} from {endpoint} failed "
                                   f"({type(e).__name__}: {str(e)[:300]}). Nothing was installed; queue the prompt "
                                   f"again to restart the download. {manual_steps(name, final)}") from e
        counter.file_done(sizes[filename])

    _verify(name, staging, final)
    shutil.rmtree(os.path.join(staging, ".cache"), ignore_errors=True)   # huggingface_hub's bookkeeping
    if os.path.exists(final):      # another process finished first: keep what is there
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.rename(staging, final)
    return final


def _file_info(huggingface_hub, name: str, final: str, endpoint: str) -> tuple[str, dict[str, int]]:
    """The commit `main` points at and each file's size, asked once without retries, so an unreachable
    hub fails fast with instructions (huggingface_hub alone would retry for about 20 s first)."""
    repo = repo_id(name)
    commit, sizes = None, {}
    for filename in FILES:
        url = huggingface_hub.hf_hub_url(repo, filename, revision=commit or "main", endpoint=endpoint)
        try:
            meta = huggingface_hub.get_hf_file_metadata(url, **_accepted(huggingface_hub.get_hf_file_metadata,
                                                                          endpoint=endpoint))
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = (" The hub refused access: set HF_TOKEN if your endpoint needs a token."
                    if status in (401, 403) else "")
            raise HubDownloadError(
                f"[LinFusion] cannot reach {url} to download {repo} ({type(e).__name__}"
                f"{f', HTTP {status}' if status else ''}: {str(e)[:200]}).{hint} Nothing was written. "
                f"{manual_steps(name, final)}") from e
        if not meta.commit_hash or meta.size is None:
            raise HubDownloadError(f"[LinFusion] {url} did not answer like a Hugging Face hub (no commit or size "
                                   f"header); check HF_ENDPOINT. {manual_steps(name, final)}")
        commit = commit or meta.commit_hash
        sizes[filename] = meta.size
    return commit, sizes


def _verify(name: str, staging: str, final: str) -> None:
    """The loader's own checks on the downloaded pair, before it gets its final name; a bad pair is deleted."""
    try:
        weights = peek_linfusion(staging, display_name=f"{repo_id(name)} (downloaded)")
        if not families_compatible(weights.family, RELEASES[name]):
            raise LinFusionLoadError(f"{repo_id(name)} (downloaded) holds weights for {weights.family}, "
                                     f"expected {RELEASES[name]}")
    except LinFusionLoadError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise HubDownloadError(f"[LinFusion] the download of {repo_id(name)} is corrupt and was deleted: {e}. "
                               f"Queue the prompt again to retry. {manual_steps(name, final)}") from e


def _accepted(function, **kwargs) -> dict:
    """The keyword arguments `function` takes: ComfyUI installs come with many huggingface_hub versions."""
    params = inspect.signature(function).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _is_interrupt(error: BaseException) -> bool:
    # ComfyUI's cancel exception, recognised by name so this module needs nothing from comfy.
    return type(error).__name__ == "InterruptProcessingException"


class _ByteCounter:
    """Bytes done over all files, reported through `progress`; `check_interrupt` runs on every chunk."""

    def __init__(self, total: int, progress, check_interrupt):
        self.total, self.done, self.finished = total, 0, 0
        self.progress, self.check_interrupt = progress, check_interrupt

    def advance(self, n: int) -> None:
        self.done += n
        self._report()

    def file_done(self, size: int) -> None:
        self.finished += size
        self.done = self.finished
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        if self.check_interrupt is not None:
            self.check_interrupt()

    def tqdm_class(self):
        from huggingface_hub.utils import tqdm as hub_tqdm   # honours HF_HUB_DISABLE_PROGRESS_BARS
        counter = self

        class _Bar(hub_tqdm):
            def update(self, n=1):
                counter.advance(n or 0)
                return super().update(n)

        return _Bar

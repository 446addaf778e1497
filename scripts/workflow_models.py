#!/usr/bin/env python3
"""Fetch the model files a workflow names into ComfyUI's models folders.

    python3 scripts/comfy_host.py models linfusion_1_sd15_txt2img_2048      # into the host's ComfyUI/models/
    python3 scripts/comfy_host.py models linfusion_4_controlnet_2048 linfusion_6_lora_2048 --dry-run
    python scripts/workflow_models.py my_graph.json --models-dir /path/to/ComfyUI/models   # any Python with huggingface_hub

A workflow names its files the way ComfyUI's frontend reads them for its missing-models panel: entries
{name, url, directory} in the workflow's own `models`, and in a node's `properties.models` for the files its
widgets name (subgraphs included). Each file goes to `<models dir>/<directory>/<name>`:
- a file already there is left alone;
- huggingface.co URLs are fetched with huggingface_hub, as Load LinFusion's downloads are: HF_ENDPOINT (a mirror),
  HF_TOKEN and HF_HUB_OFFLINE apply; other http(s) URLs with the standard library;
- the transfer goes to a hidden name beside the target (`.<name>.download/`, `.<name>.part`) and is renamed to the
  final name only once complete, so a cut or cancelled transfer never leaves a file ComfyUI would list (the next
  run resumes a hub transfer, restarts any other);
- a lock (`.<name>.lock` beside the target, an fcntl lock): a second process asking for the same file waits for
  the first, then finds the file there and fetches nothing.
The LinFusion weights are not listed in the workflows: Load LinFusion downloads them on first use.
Only the standard library is imported until a hub file is fetched.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "example_workflows"
HUB_HOSTS = ("huggingface.co", "hf.co")
DEFAULT_ENDPOINT = "https://huggingface.co"


class ModelError(Exception):
    """A workflow entry that cannot be fetched as it stands."""


def say(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def workflow_path(arg: str) -> Path:
    """A workflow file, or the name of an example workflow (with or without .json)."""
    path = Path(arg)
    if path.is_file():
        return path
    name = arg if arg.endswith(".json") else arg + ".json"
    for candidate in (name, "linfusion_" + name):   # the examples' names before they carried "linfusion_"
        if (WORKFLOW_DIR / candidate).is_file():
            return WORKFLOW_DIR / candidate
    examples = ", ".join(sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")))
    raise ModelError(f"no workflow {arg!r}: give a .json file or one of the examples: {examples}")


def model_entries(workflow: dict) -> list[dict]:
    """The workflow's model entries as the frontend collects them: the top-level `models`, and a node's entries
    for the files its widgets name now (one the user swapped for another file is not fetched); each
    (directory, name) once, in the order they appear."""
    found = list(workflow.get("models") or [])
    graphs = [workflow, *((workflow.get("definitions") or {}).get("subgraphs") or [])]
    for graph in graphs:
        for node in graph.get("nodes") or []:
            values = node.get("widgets_values") or []
            values = values.values() if isinstance(values, dict) else values
            shown = {v for v in values if isinstance(v, str) and v.strip()}
            found += [m for m in (node.get("properties") or {}).get("models") or [] if m.get("name") in shown]
    entries, seen = [], set()
    for entry in found:
        key = (entry.get("directory"), entry.get("name"))
        if key not in seen:
            seen.add(key)
            entries.append(entry)
    return entries


def _plain(part: object) -> bool:
    return isinstance(part, str) and part not in ("", ".", "..") and "/" not in part and "\\" not in part \
        and not part.startswith(".")


def target_path(models_dir: Path, entry: dict) -> Path:
    """Where an entry goes; names and folders that would leave the models folder are refused."""
    name, directory, url = entry.get("name"), entry.get("directory"), entry.get("url")
    if not _plain(name) or not _plain(directory):
        raise ModelError(f"refused: name {name!r} in folder {directory!r} is not a plain file and folder name")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise ModelError(f"{directory}/{name}: no http(s) URL to fetch it from ({url!r})")
    return models_dir / directory / name


def hub_file(url: str) -> tuple[str | None, str, str, str] | None:
    """(repo type, repo id, revision, file in repo) of a huggingface.co `.../resolve/...` URL, else None."""
    parts = urlsplit(url)
    if parts.hostname not in HUB_HOSTS:
        return None
    path = [unquote(p) for p in parts.path.strip("/").split("/")]
    repo_type = None
    if path and path[0] in ("datasets", "spaces"):
        repo_type, path = path[0][:-1], path[1:]
    if len(path) < 5 or path[2] != "resolve":
        return None
    return repo_type, f"{path[0]}/{path[1]}", path[3], "/".join(path[4:])


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at its import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@contextlib.contextmanager
def file_lock(target: Path):
    """An exclusive lock on `.<name>.lock` beside `target`, for one process at a time. The holder removes the lock
    file when done; a waiter that then gets the lock of a removed file takes a fresh one."""
    lock = target.parent / f".{target.name}.lock"
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                if not said:
                    say(f"waiting: another process is fetching {target} (lock {lock.name})")
                    said = True
                _lock(fd)
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)     # releases the lock


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
except ImportError:      # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.5)


def fetch_from_hub(hub: tuple[str | None, str, str, str], target: Path) -> None:
    """huggingface_hub's transfer (its progress bar, its resume) into `.<name>.download/`, then the rename."""
    import huggingface_hub

    repo_type, repo_id, revision, filename = hub
    staging = target.parent / f".{target.name}.download"
    kwargs = {}
    if not sys.stderr.isatty() and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        kwargs["tqdm_class"] = _lines_bar()     # its bar stays silent in a log: progress lines instead
    path = huggingface_hub.hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                           local_dir=staging, endpoint=hub_endpoint(), **kwargs)
    os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


class _Progress:
    """Bytes so far on stderr: one line redrawn on a terminal, a line every 10 % (or 64 MB) in a log."""

    def __init__(self, total: int, initial: int = 0):
        self.total, self.done, self.shown = total, initial, -1
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        step = int(self.done * 10 / self.total) if self.total else self.done >> 26   # every 10 %, or 64 MB
        if self.tty or step != self.shown:
            self.shown = step
            of = f" of {self.total / 1e6:.1f}" if self.total else ""
            start, end = ("\r", "") if self.tty else ("", "\n")
            sys.stderr.write(f"{start}  {self.done / 1e6:.1f}{of} MB{end}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _lines_bar():
    """huggingface_hub's tqdm (it honours HF_HUB_DISABLE_PROGRESS_BARS) reporting through _Progress too."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _Lines(hub_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._lines = _Progress(kwargs.get("total") or 0, kwargs.get("initial") or 0)

        def update(self, n=1):
            self._lines.update(n or 0)
            return super().update(n)

    return _Lines


def fetch_from_url(url: str, target: Path) -> None:
    """Any other URL, into `.<name>.part`, renamed once the whole body (Content-Length) has arrived."""
    part = target.parent / f".{target.name}.part"
    request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-LinFusion workflow_models"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            progress = _Progress(total)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.update(len(chunk))
            progress.close()
        if total and progress.done != total:
            raise OSError(f"the transfer stopped after {progress.done} of {total} bytes")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def fetch(entry: dict, target: Path) -> str:
    """Fetch one entry unless its file is there; what happened, in words."""
    if target.exists():
        return "already there"
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        if target.exists():
            return "already there (fetched by another process meanwhile)"
        hub = hub_file(entry["url"])
        if hub:
            say(f"{target} <- {hub[1]} {hub[3]} (revision {hub[2]}) from {hub_endpoint()}")
            fetch_from_hub(hub, target)
        else:
            say(f"{target} <- {entry['url']}")
            fetch_from_url(entry["url"], target)
    return f"fetched ({target.stat().st_size / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/comfy_host.py models",
        description="Fetch the model files a workflow names (the frontend's missing-models entries) into ComfyUI's "
                    "models folders. huggingface.co files come through huggingface_hub (HF_ENDPOINT, HF_TOKEN); each "
                    "file is written under a hidden name and renamed when complete, under a lock beside it.")
    parser.add_argument("workflows", nargs="+", metavar="WORKFLOW",
                        help="an example workflow's name (linfusion_1_sd15_txt2img_2048) or a workflow .json file")
    parser.add_argument("--models-dir", type=Path, required=True,
                        help="ComfyUI's models folder (comfy_host.py passes its host's ComfyUI/models)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and whether they are there; fetch none")
    args = parser.parse_args(argv)
    try:
        entries = []
        for arg in args.workflows:
            entries += [(e, target_path(args.models_dir, e))
                        for e in model_entries(json.loads(workflow_path(arg).read_text(encoding="utf-8")))]
    except ModelError as e:
        print(f"[models] {e}", file=sys.stderr)
        return 2
    todo = list({target: (entry, target) for entry, target in entries}.values())
    if not todo:
        say("the workflows name no model files")
    failed = 0
    for i, (entry, target) in enumerate(todo, 1):
        head = f"{i}/{len(todo)} {target.parent.name}/{target.name}"
        if args.dry_run:
            say(f"{head}: {'there' if target.exists() else 'missing'} ({entry['url']})")
            continue
        try:
            say(f"{head}: {fetch(entry, target)}")
        except Exception as e:  # one file's failure does not stop the others
            failed += 1
            say(f"{head}: FAILED ({type(e).__name__}: {str(e)[:300]}). Nothing was put at {target}; run this again "
                f"to retry, or download {entry['url']} to that path by hand.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Boot the real ComfyUI host in-process, as its main.py does, and run API-format prompts through its queue.

ComfyUI is started through `main.start_comfyui()`, the entry point main.py itself calls (and returns from for
"other code" that integrates with ComfyUI): its command line, its executor and cache settings (each host's
own defaults), its prompt worker thread, progress hook and custom-node loader. A prompt goes in as the HTTP
API's POST /prompt puts it in (`execution.validate_prompt`, then the server's prompt queue) and its result is
read from the queue's history, as GET /history serves it; the HTTP server itself listens on a free port
of 127.0.0.1 (`host.url`, `host.get_json`). The extension is loaded by ComfyUI's own loader
from the custom_nodes folder of a base directory of this session, which holds a link to this checkout,
exactly as a user's clone in `ComfyUI/custom_nodes` is loaded. Nothing of ComfyUI is stubbed.
"""
from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from scratch import scratch_dir

REPO = Path(__file__).resolve().parent.parent
EXTENSION_DIR_NAME = "ComfyUI-LinFusion"
TEST_NODES_DIR = Path(__file__).resolve().parent / "support" / "custom_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_comfy_main(comfy_path: Path):
    """ComfyUI's main.py as the module `main`, whatever else took that name first.

    pytest imports the `__init__.py` of the directory it runs from as a package named after that directory,
    so in a checkout named `main` (as CI clones it) `import main` would return this extension, not ComfyUI."""
    main_py = (comfy_path / "main.py").resolve()
    taken = sys.modules.get("main")
    if taken is not None:
        if Path(getattr(taken, "__file__", "") or "").resolve() == main_py:
            return taken
        del sys.modules["main"]
    spec = importlib.util.spec_from_file_location("main", main_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules["main"] = module
    spec.loader.exec_module(module)
    return module


class PromptFailed(RuntimeError):
    """A prompt failed validation or execution; the message is ComfyUI's own."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details


@dataclass
class RunResult:
    ui: dict
    captured: dict            # CaptureOutput node id -> value given to it
    progress: list = field(default_factory=list)   # (node_id, value, total) from ComfyUI's progress hook
    messages: list = field(default_factory=list)


class ComfyHost:
    """One in-process ComfyUI per test session."""

    def __init__(self, comfy_path: Path, model_root: Path):
        self.comfy_path = comfy_path
        self.model_root = model_root
        self.progress: list = []
        self._numbers = itertools.count()
        self._boot()

    def _boot(self) -> None:
        # A base directory of this session, laid out as a user's ComfyUI folder: custom_nodes/ holds only this
        # checkout (by link, as a dev checkout is installed) and the test-only capture node, so the loader never
        # sees other packs a developer's ComfyUI may have; models, input, output, user and temp are this run's
        # own, never the host's, which other runs share (and the database is in memory for the same reason).
        base = scratch_dir("linfusion-comfy-base-")   # ComfyUI serves from it until the process ends
        nodes_dir = base / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / EXTENSION_DIR_NAME).symlink_to(REPO, target_is_directory=True)
        for f in TEST_NODES_DIR.iterdir():
            if f.suffix == ".py":
                (nodes_dir / f.name).symlink_to(f)
        self.base_directory = base
        self.extension_path = str(nodes_dir / EXTENSION_DIR_NAME)

        sys.path.insert(0, str(self.comfy_path))
        # comfy.cli_args parses sys.argv once, at its first import (main.py's first lines).
        saved_argv = sys.argv
        # No API nodes: they call paid web services, which tests never reach.
        self.port = free_port()
        sys.argv = ["main.py", "--cpu", "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
                    "--database-url", "sqlite:///:memory:", "--listen", "127.0.0.1", "--port", str(self.port)]
        try:
            main = import_comfy_main(self.comfy_path)
        finally:
            sys.argv = saved_argv

        import folder_paths
        for kind in ("checkpoints", "loras", "controlnet", "vae", "diffusion_models"):
            folder_paths.add_model_folder_path(kind, str(self.model_root / kind), is_default=True)

        self.loop, self.server, start_all = main.start_comfyui()
        # The HTTP server on its event loop, as main.py runs it (in a thread here, so tests keep this one):
        # the HTTP API answers at self.url, and validation runs on this loop as POST /prompt runs it.
        threading.Thread(target=self.loop.run_forever, daemon=True, name="comfy-server-loop").start()
        asyncio.run_coroutine_threadsafe(start_all(), self.loop)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_for_http()
        # linfusion is registered by the extension itself; add the fixture folder beside its default.
        folder_paths.add_model_folder_path("linfusion", str(self.model_root / "linfusion"))
        import comfy.utils
        import execution
        import nodes
        self._install_progress_hook(comfy.utils)
        self.nodes = nodes
        self.execution = execution
        self.queue = self.server.prompt_queue

    def _wait_for_http(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get_json("/system_stats")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI's HTTP server did not answer on {self.url} in {timeout:.0f} s")
                time.sleep(0.1)

    def get_json(self, path: str):
        """GET one of the HTTP API's routes (/object_info, /history/<id>, ...) from this session's server."""
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def _install_progress_hook(self, comfy_utils) -> None:
        """Record every progress update on its way to the hook main.py installed (which sends it to the
        browser and raises when the user pressed cancel)."""
        import comfy.model_management
        from comfy_execution.utils import get_executing_context
        served = comfy_utils.PROGRESS_BAR_HOOK

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            ctx = get_executing_context()
            self.progress.append((node_id if node_id is not None or ctx is None else ctx.node_id, value, total))
            if ctx is None and prompt_id is None:
                # A test calling ComfyUI's functions itself, outside any prompt: there is no prompt to report
                # to (main.py's hook would look for one), but a cancel is honoured as the served hook does.
                comfy.model_management.throw_exception_if_processing_interrupted()
                return
            served(value, total, preview_image, prompt_id=prompt_id, node_id=node_id)

        comfy_utils.set_progress_bar_global_hook(hook)

    @property
    def extension_module(self):
        return sys.modules[self.extension_path.replace(".", "_x_")]

    def import_core(self):
        """The linfusion_core package exactly as ComfyUI's loader imported it (same class objects)."""
        return sys.modules[self.extension_module.__name__ + ".linfusion_core"]

    def run(self, prompt: dict, *, expect_error: bool = False) -> RunResult:
        import capture_output_node as cap  # registered by the loader from tests/support/custom_nodes

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run_coroutine_threadsafe(self.execution.validate_prompt(prompt_id, prompt, None),
                                                 self.loop).result()
        if not valid[0]:
            if expect_error:
                return valid
            raise PromptFailed(f"prompt invalid: {valid[1]} {valid[3]}", valid)
        self.progress = []
        cap.CAPTURED.clear()
        # What POST /prompt queues: (number, id, prompt, extra_data, outputs to execute, sensitive data).
        self.queue.put((next(self._numbers), prompt_id, prompt, {}, valid[2], {}))
        entry = self._wait_for_history(prompt_id)
        messages = [tuple(m) for m in entry["status"]["messages"]]
        errors = [m for m in messages if m[0] in ("execution_error", "execution_interrupted")]
        if errors:
            event, data = errors[0]
            err = PromptFailed(f"{event}: {data.get('exception_type')}: {data.get('exception_message')}", data)
            if expect_error:
                return err
            raise err
        if expect_error:
            raise AssertionError("the prompt was expected to fail but succeeded")
        return RunResult(ui=entry["outputs"], captured=dict(cap.CAPTURED), progress=list(self.progress),
                         messages=messages)

    def _wait_for_history(self, prompt_id: str) -> dict:
        while True:
            history = self.queue.get_history(prompt_id=prompt_id)
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.01)

    def reset_cache(self) -> None:
        """Forget cached node outputs (and unload models), so the next run executes every node again: what the
        HTTP API's POST /free {"free_memory": true} asks of the prompt worker, which does it when it is idle.
        A prompt queued behind it returns once the worker has done so (the test may then touch models itself)."""
        import capture_output_node as cap

        self.queue.set_flag("free_memory", True)
        waited = 0
        while self.queue.get_flags(reset=False):    # taken: the worker acts on it before its next prompt
            time.sleep(0.01)
            waited += 1
            if waited % 50 == 0:
                # set_flag's notify is lost when it lands while the worker is between two waits; the worker then
                # sleeps its full queue timeout (up to 1000 s) before it looks at the flags: wake it again.
                with self.queue.mutex:
                    self.queue.not_empty.notify()
        barrier = {"barrier": {"class_type": "LinFusionTest_Capture", "inputs": {"value": 0}}}
        prompt_id = str(uuid.uuid4())
        self.queue.put((next(self._numbers), prompt_id, barrier, {}, ["barrier"], {}))
        self._wait_for_history(prompt_id)
        cap.CAPTURED.clear()


_HOST: ComfyHost | None = None


def get_host(model_root: Path) -> ComfyHost:
    global _HOST
    if _HOST is None:
        comfy_path = os.environ.get("COMFYUI_PATH")
        if not comfy_path:
            raise RuntimeError("COMFYUI_PATH is not set: run the tests with `python3 scripts/comfy_host.py test`")
        logging.getLogger().setLevel(logging.INFO)
        _HOST = ComfyHost(Path(comfy_path), model_root)
    return _HOST

"""Boot the real ComfyUI host in-process and run API-format prompts through its own executor.

The extension is loaded by ComfyUI's own custom-node loader (`nodes.init_extra_nodes`), from a
custom_nodes folder that holds a link to this checkout, exactly as a user's clone in
`ComfyUI/custom_nodes` is loaded. Nothing of ComfyUI is stubbed: the PromptServer, the executor,
validation, caching and progress reporting are the host's.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTENSION_DIR_NAME = "ComfyUI-LinFusion"
TEST_NODES_DIR = Path(__file__).resolve().parent / "support" / "custom_nodes"


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
        self._boot()

    def _boot(self) -> None:
        sys.path.insert(0, str(self.comfy_path))
        # comfy.cli_args parses sys.argv once, at its first import.
        saved_argv = sys.argv
        # Outputs and inputs in folders of this session: never the host's own, which other runs share.
        sys.argv = ["main.py", "--cpu", "--disable-auto-launch",
                    "--output-directory", tempfile.mkdtemp(prefix="linfusion-out-"),
                    "--input-directory", tempfile.mkdtemp(prefix="linfusion-in-")]
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
        sys.argv = saved_argv
        # main.py imports the top-level `utils` package this early; a later import path would find
        # comfy/utils.py under that name instead.
        import utils.extra_config  # noqa: F401

        import folder_paths
        # A custom_nodes folder with only this checkout (by link, as a dev checkout is installed) and the
        # test-only capture node: the loader never sees other packs a developer's ComfyUI may have.
        nodes_dir = Path(tempfile.mkdtemp(prefix="linfusion-custom-nodes-"))
        (nodes_dir / EXTENSION_DIR_NAME).symlink_to(REPO, target_is_directory=True)
        for f in TEST_NODES_DIR.iterdir():
            if f.suffix == ".py":
                (nodes_dir / f.name).symlink_to(f)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(nodes_dir)], set())
        self.extension_path = str(nodes_dir / EXTENSION_DIR_NAME)
        for kind in ("checkpoints", "loras", "controlnet", "vae", "diffusion_models"):
            folder_paths.add_model_folder_path(kind, str(self.model_root / kind), is_default=True)

        import execution
        import nodes
        import server
        import comfy.utils

        self.loop = asyncio.new_event_loop()
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        # linfusion is registered by the extension itself; add the fixture folder beside its default.
        folder_paths.add_model_folder_path("linfusion", str(self.model_root / "linfusion"))
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self._install_progress_hook(comfy.utils)
        self.nodes = nodes
        self.execution = execution

    def _install_progress_hook(self, comfy_utils) -> None:
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            ctx = get_executing_context()
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            # ComfyUI's own hook raises here when the user pressed cancel.
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.progress.append((node_id, value, total))

        comfy_utils.set_progress_bar_global_hook(hook)

    @property
    def extension_module(self):
        return sys.modules[self.extension_path.replace(".", "_x_")]

    def import_core(self):
        """The linfusion_core package exactly as ComfyUI's loader imported it (same class objects)."""
        return sys.modules[self.extension_module.__name__ + ".linfusion_core"]

    def run(self, prompt: dict, *, expect_error: bool = False) -> RunResult:
        from comfy_execution import graph  # noqa: F401  (ensures the host's graph module is loaded)
        import capture_output_node as cap  # registered by the loader from tests/support/custom_nodes

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            if expect_error:
                return valid
            raise PromptFailed(f"prompt invalid: {valid[1]} {valid[3]}", valid)
        self.progress = []
        cap.CAPTURED.clear()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        errors = [m for m in self.executor.status_messages if m[0] in ("execution_error", "execution_interrupted")]
        if errors:
            event, data = errors[0]
            err = PromptFailed(f"{event}: {data.get('exception_type')}: {data.get('exception_message')}", data)
            if expect_error:
                return err
            raise err
        if expect_error:
            raise AssertionError("the prompt was expected to fail but succeeded")
        return RunResult(ui=self.executor.history_result["outputs"], captured=dict(cap.CAPTURED),
                         progress=list(self.progress), messages=list(self.executor.status_messages))

    def reset_cache(self) -> None:
        """Forget cached node outputs, so the next run executes every node again."""
        self.executor.reset()


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

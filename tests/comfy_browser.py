"""Drive the real ComfyUI frontend in headless Chromium (Debian's `chromium`, through Playwright).

Only the system Chromium is used (never a browser download): Playwright talks to it over CDP.
The server is a real ComfyUI process started with `--base-directory` in a temporary folder, so it
has its own custom_nodes (a link to this checkout), user settings and output, and an
extra_model_paths.yaml that points at the fixture models.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from comfy_server import comfy_server, free_port

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LINFUSION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL_KINDS = ("checkpoints", "loras", "controlnet", "vae", "linfusion", "clip_vision", "ipadapter")
# First-run popups would cover the canvas; a user who dismissed them once has these settings.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Minimap.Visible": False}
# The frontend keeps this one in the browser's storage, not in the user settings.
DISMISS_BANNER_JS = "localStorage.setItem('vueNodesBannerDismissed', 'true')"


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not Path(CHROMIUM).is_file():
        return (f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium), "
                "as .ci/run does, or point LINFUSION_CHROMIUM at one")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is missing (tests/requirements.txt installs it)"
    return None


@contextlib.contextmanager
def comfy_ui_server(comfy_path: Path, model_root: Path, log_dir: Path):
    """A ComfyUI server process with this extension and the fixture models; yields its base URL."""
    base = Path(tempfile.mkdtemp(prefix="linfusion-browser-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-LinFusion").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    paths = "\n".join(f"    {k}: {k}" for k in MODEL_KINDS)
    (base / "extra_model_paths.yaml").write_text(f"linfusion_fixtures:\n    base_path: {model_root}\n{paths}\n")
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
           "--disable-auto-launch"]
    try:
        with comfy_server(cmd, port, cwd=comfy_path, log_path=log_dir / "comfyui-browser-server.log") as url:
            yield url, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def chromium_page(url: str):
    """A page of a fresh Chromium profile at `url`, once the ComfyUI app is ready; console errors are kept
    in page.console_errors."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="linfusion-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 1000})
            try:
                context.add_init_script(DISMISS_BANNER_JS)
                page = context.pages[0] if context.pages else context.new_page()
                page.console_errors = []
                page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
                page.on("pageerror", lambda e: page.console_errors.append(str(e)))
                page.goto(url)
                page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


LOAD_WORKFLOW_JS = """async ([wf, name]) => {
    const registered = window.LiteGraph.registered_node_types;
    const missing = [...new Set(wf.nodes.map(n => n.type).filter(t => !(t in registered)))];
    await window.app.loadGraphData(wf, true, true, name);
    window.app.canvas.draw(true, true);
    const nodes = window.app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title,
        has_errors: !!n.has_errors, widgets: (n.widgets || []).map(w => w.name),
        size: [n.size[0], n.size[1]]}));
    const dialog = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).join('\\n');
    return {missing, nodes, dialog};
}"""

GRAPH_TO_PROMPT_JS = "async () => (await window.app.graphToPrompt()).output"


def load_workflow(page, workflow: dict, name: str) -> dict:
    """Load a UI-format workflow as a drag-and-drop does; returns what the frontend made of it."""
    return page.evaluate(LOAD_WORKFLOW_JS, [workflow, name])


def close_dialogs(page) -> None:
    page.keyboard.press("Escape")
    page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(m => m.remove())")


def frontend_prompt(page) -> dict:
    """The API prompt the frontend itself builds from the loaded graph (what Queue would send)."""
    return page.evaluate(GRAPH_TO_PROMPT_JS)

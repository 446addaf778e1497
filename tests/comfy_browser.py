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
# The part of the 1600 x 1000 canvas (CSS px) that the side bar and the top bars leave free (frontend 1.32).
FREE_CANVAS = {"x": 60, "y": 105, "width": 1540, "height": 895}
# The frontend keeps this one in the browser's storage, not in the user settings.
DISMISS_BANNER_JS = "localStorage.setItem('vueNodesBannerDismissed', 'true')"


def frontends() -> list[tuple[str, Path | None]]:
    """(label, --front-end-root) of the frontends the browser tests run on: the host's pinned one, and on ComfyUI
    0.33 the newest on the registry, which scripts/comfy_host.py unpacks and names in LINFUSION_NEWEST_FRONTEND.
    Under CI=true a 0.33 run without it fails (tests/test_browser.py), so the second frontend cannot drop out."""
    found = [("pinned", None)]
    newest = os.environ.get("LINFUSION_NEWEST_FRONTEND")
    if os.environ.get("LINFUSION_HOST") == "0.33" and newest:
        found.append(("newest", Path(newest)))
    return found


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
def comfy_ui_server(comfy_path: Path, model_root: Path, log_dir: Path, *, settings: dict | None = None,
                    custom_nodes: tuple[Path, ...] = (), front_end_root: Path | None = None):
    """A ComfyUI server process with this extension (and the packs in `custom_nodes`, linked in) and the fixture
    models; `settings` are added to the user's; `front_end_root` serves that frontend instead of the host's
    pinned one. Yields (base URL, server base folder)."""
    base = Path(tempfile.mkdtemp(prefix="linfusion-browser-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-LinFusion").symlink_to(REPO, target_is_directory=True)
    for pack in custom_nodes:
        (base / "custom_nodes" / pack.name).symlink_to(pack, target_is_directory=True)
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({**SETTINGS, **(settings or {})}))
    paths = "\n".join(f"    {k}: {k}" for k in MODEL_KINDS)
    (base / "extra_model_paths.yaml").write_text(f"linfusion_fixtures:\n    base_path: {model_root}\n{paths}\n")
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
           "--disable-auto-launch"] + (["--front-end-root", str(front_end_root)] if front_end_root else [])
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

# What the canvas shows after a load. LiteGraph draws every node as a blank box (no title, no widgets) below a
# zoom threshold. Frontend 1.32 derives it from the setting LiteGraph.Canvas.MinFontSizeForLOD and keeps it in
# the private canvas._lowQualityZoomThreshold; earlier frontends had the setting
# LiteGraph.Canvas.LowQualityRenderingZoomThreshold (default 0.6) and canvas.low_quality_zoom_threshold. Read
# whichever this frontend has; null when none (the caller then falls back to 0.6, the documented default).
CANVAS_VIEW_JS = """() => {
    const c = window.app.canvas;
    c.draw(true, true);
    const setting = window.app.extensionManager?.setting?.get?.('LiteGraph.Canvas.LowQualityRenderingZoomThreshold');
    const threshold = [c.low_quality_zoom_threshold, c._lowQualityZoomThreshold, setting]
        .find(v => typeof v === 'number' && v > 0) ?? null;
    const ctx = c.ctx || c.canvas.getContext('2d');
    const groups = window.app.graph.groups.map(g => {
        ctx.save();
        ctx.font = `${g.font_size}px ${window.LiteGraph.GROUP_FONT || 'Arial'}`;
        const titleWidth = ctx.measureText(g.title).width;
        ctx.restore();
        return {title: g.title, bounding: [...g._bounding], title_width: titleWidth, font_size: g.font_size};
    });
    // Notes (DOM widgets): does the text end inside the box, so none of it is hidden behind a scroll bar?
    const notes = window.app.graph.nodes.filter(n => n.type === 'MarkdownNote' || n.type === 'Note').map(n => {
        const el = n.widgets?.[0]?.element;
        if (!el) return {id: n.id, title: n.title, measured: false};
        const box = el.getBoundingClientRect();
        const blocks = [...(el.querySelector('.ProseMirror') || el).children].map(k => k.getBoundingClientRect().bottom);
        const textBottom = blocks.length ? Math.max(...blocks) : box.top;
        return {id: n.id, title: n.title, measured: box.height > 0, fits: textBottom <= box.bottom + 1,
                text_height: (textBottom - box.top) / c.ds.scale, box_height: box.height / c.ds.scale};
    });
    const dpr = window.devicePixelRatio || 1;
    return {scale: c.ds.scale, offset: [...c.ds.offset], threshold, low_quality: c.low_quality ?? null,
            width: c.canvas.width / dpr, height: c.canvas.height / dpr, groups, notes,
            nodes: window.app.graph.nodes.map(n => ({id: n.id, type: n.type, bounding: [...n.boundingRect]}))};
}"""

GRAPH_TO_PROMPT_JS = "async () => (await window.app.graphToPrompt()).output"


def load_workflow(page, workflow: dict, name: str) -> dict:
    """Load a UI-format workflow as a drag-and-drop does; returns what the frontend made of it."""
    return page.evaluate(LOAD_WORKFLOW_JS, [workflow, name])


def canvas_view(page) -> dict:
    """Scale, offset, low-quality threshold (or None) and flag, canvas size in CSS px, group titles with their
    drawn widths, whether each note's text fits its box, and node rectangles (graph units, title bar included)
    of the loaded graph."""
    return page.evaluate(CANVAS_VIEW_JS)


def close_dialogs(page) -> None:
    page.keyboard.press("Escape")
    page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(m => m.remove())")


def frontend_prompt(page) -> dict:
    """The API prompt the frontend itself builds from the loaded graph (what Queue would send). Of `_meta` only
    the title is kept: frontend 1.58 adds the node's registry id and version there (cnr_id, ver), which the
    server does not read."""
    prompt = page.evaluate(GRAPH_TO_PROMPT_JS)
    for node in prompt.values():
        if "_meta" in node:
            node["_meta"] = {k: v for k, v in node["_meta"].items() if k == "title"}
    return prompt


TEMPLATES_COMMAND = "Comfy.BrowseTemplates"
OPENED_JS = """(name) => {
    const active = window.app.extensionManager?.workflow?.activeWorkflow;
    return !!active && active.filename === name && window.app.graph.nodes.length > 0;
}"""


CLOSE_NAMED_JS = """async (name) => {
    const store = window.app.extensionManager.workflow;
    for (const wf of [...store.openWorkflows].filter(w => w.filename === name)) await store.closeWorkflow(wf);
}"""


def close_workflow(page, name: str) -> None:
    """Close the open workflow tabs named `name` without the unsaved-changes question (the store's own close):
    opening a template whose tab is open only switches to that tab, with its view, instead of opening afresh."""
    page.evaluate(CLOSE_NAMED_JS, name)


def open_template(page, module: str, name: str) -> None:
    """Open example workflow `name` (no .json) of extension `module` as a user does: the Templates panel (its
    command, the toolbar's Templates button), the extension's entry under Extensions, then the card titled `name`.
    A tab of that name already open is closed first. Returns once the workflow is the active one and the frontend
    has placed it (it fits the graph to the window itself and ignores the saved zoom)."""
    close_workflow(page, name)
    page.evaluate("(id) => window.app.extensionManager.command.execute(id)", TEMPLATES_COMMAND)
    dialog = page.locator("[role=dialog]").last       # the workflow tabs carry the same names
    dialog.get_by_text(module, exact=True).first.click()
    dialog.get_by_text(name, exact=True).first.click()
    page.wait_for_function(OPENED_JS, arg=name, timeout=60_000)
    page.wait_for_timeout(800)      # the fit runs after the load; let it and a redraw settle

"""The frontend's missing-models dialog offers the downloads the example workflows carry.

A real ComfyUI server without the workflows' model files (it has only the fixtures), the real frontend in
headless Chromium with the dialog switched on, as on a fresh install. The page may only reach the server:
every other request (the dialog asks the hub for file sizes) is aborted. Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from comfy_browser import chromium_missing_reason, chromium_page, close_dialogs, comfy_ui_server, frontends, load_workflow
from third_party_packs import IPADAPTER, unpack
from workflow_shrink import load

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
EXPECTED = {
    "linfusion_1_sd15_txt2img_2048.json": {
        ("checkpoints", "v1-5-pruned-emaonly.safetensors"):
            "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
    },
    "linfusion_5_ipadapter.json": {
        ("ipadapter", "ip-adapter-plus_sd15.safetensors"):
            "https://huggingface.co/h94/IP-Adapter/resolve/main/models/ip-adapter-plus_sd15.safetensors",
        ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"):
            "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
    },
}
SHOW_DIALOG_JS = """async () => {
    await window.app.extensionManager.setting.set('Comfy.Workflow.ShowMissingModelsWarning', true);
    return window.app.extensionManager.setting.get('Comfy.Workflow.ShowMissingModelsWarning');
}"""

_reason = chromium_missing_reason()
if _reason:
    pytest.skip(f"browser tests skipped: {_reason}", allow_module_level=True)


@pytest.fixture(scope="module", params=frontends(), ids=lambda f: f[0])
def page(request, fixtures):
    """The page of a server without the workflows' model files, per frontend (the host's, and on 0.33 the newest)."""
    from conftest import MODEL_ROOT

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The fixture folder without the IP-Adapter files the pack tests write there: those must be missing here.
    models = Path(tempfile.mkdtemp(prefix="linfusion-dialog-models-"))
    for sub in MODEL_ROOT.iterdir():
        if sub.name not in ("ipadapter", "clip_vision"):
            (models / sub.name).symlink_to(sub, target_is_directory=sub.is_dir())
    # With the real IP-Adapter pack: 1.49 lists the model files of installed nodes only.
    packs = (unpack(IPADAPTER, models / "packs"),)
    with comfy_ui_server(Path(os.environ["COMFYUI_PATH"]), models, ARTIFACTS, custom_nodes=packs,
                         front_end_root=request.param[1]) as (url, _base):
        with chromium_page(url) as page:
            page.route(lambda u: not u.startswith(url), lambda route: route.abort())
            assert page.evaluate(SHOW_DIALOG_JS) is True
            yield page
    shutil.rmtree(models, ignore_errors=True)


# Frontends up to 1.3x show a dialog (.comfy-missing-models) whose link buttons carry the URLs as titles; 1.49
# (ComfyUI 0.33) shows a toast whose "View details" opens an error panel with one row per file, its folder
# under the name and the URL behind a "Copy URL" button. Detected by what the page shows, not by version.
OLD_DIALOG, NEW_PANEL = ".comfy-missing-models", "[data-testid=error-group-missing-model]"


def new_panel_downloads(page) -> tuple[str, dict[tuple[str, str], str]]:
    """1.49's missing-models panel as (its text, {(folder, file): URL}), opened from its toast."""
    page.get_by_text("View details").first.click()
    panel = page.wait_for_selector(NEW_PANEL, timeout=30_000)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=page.url)
    found = {}
    for row in panel.query_selector_all("[data-testid=missing-model-importable-rows] > div"):
        name = row.eval_on_selector("button[title]:not([aria-label])", "e => e.title")
        folder = row.eval_on_selector("span.block", "e => e.innerText.trim()")
        row.query_selector("button[aria-label='Copy URL']").click()
        found[(folder, name)] = page.evaluate("() => navigator.clipboard.readText()")
    return panel.inner_text(), found


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_models_dialog_lists_the_downloads(page, name):
    close_dialogs(page)
    load_workflow(page, load(name), name)
    page.wait_for_selector(f"{OLD_DIALOG}, button:has-text('View details')", timeout=30_000)
    if page.query_selector(OLD_DIALOG):
        dialog = page.wait_for_selector(OLD_DIALOG, timeout=30_000)
        text = dialog.inner_text()
        links = page.eval_on_selector_all(f"{OLD_DIALOG} button[title]", "els => els.map(e => e.title)")
        page.screenshot(path=str(ARTIFACTS / f"missing_models_{Path(name).stem}.png"))
        for (directory, file_name), url in EXPECTED[name].items():
            assert f"{directory} / {file_name}" in text, text
            assert any(link.startswith(url) for link in links), (url, links)
    else:
        text, listed = new_panel_downloads(page)
        page.screenshot(path=str(ARTIFACTS / f"missing_models_{Path(name).stem}_{page.url.split(':')[-1].strip('/')}.png"))
        for key, url in EXPECTED[name].items():
            assert key in listed, (key, text)
            # 1.49 copies the hub's page-with-download form of the same file (/blob/...?download=true).
            assert listed[key].startswith((url, url.replace("/resolve/", "/blob/", 1))), (key, listed[key], url)
    assert "Invalid directory" not in text and "not allowed" not in text, text
    close_dialogs(page)

"""The frontend's missing-models dialog offers the downloads the example workflows carry.

A real ComfyUI server without the workflows' model files (it has only the fixtures), the real frontend in
headless Chromium with the dialog switched on, as on a fresh install. The page may only reach the server:
every other request (the dialog asks the hub for file sizes) is aborted. Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfy_browser import chromium_missing_reason, chromium_page, close_dialogs, comfy_ui_server, load_workflow
from workflow_shrink import load

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
EXPECTED = {
    "1_sd15_txt2img_2048.json": {
        ("checkpoints", "v1-5-pruned-emaonly.safetensors"):
            "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
    },
    "5_ipadapter.json": {
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


@pytest.fixture(scope="module")
def page(fixtures):
    from conftest import MODEL_ROOT

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfy_ui_server(Path(os.environ["COMFYUI_PATH"]), MODEL_ROOT, ARTIFACTS) as (url, _base):
        with chromium_page(url) as page:
            page.route(lambda u: not u.startswith(url), lambda route: route.abort())
            assert page.evaluate(SHOW_DIALOG_JS) is True
            yield page


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_models_dialog_lists_the_downloads(page, name):
    close_dialogs(page)
    load_workflow(page, load(name), name)
    dialog = page.wait_for_selector(".comfy-missing-models", timeout=30_000)
    text = dialog.inner_text()
    links = page.eval_on_selector_all(".comfy-missing-models button[title]", "els => els.map(e => e.title)")
    page.screenshot(path=str(ARTIFACTS / f"missing_models_{Path(name).stem}.png"))
    for (directory, file_name), url in EXPECTED[name].items():
        assert f"{directory} / {file_name}" in text, text
        assert any(link.startswith(url) for link in links), (url, links)
    assert "Invalid directory" not in text and "not allowed" not in text, text
    close_dialogs(page)

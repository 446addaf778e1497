"""`python3 scripts/comfy_host.py models <workflow>` (scripts/workflow_models.py): the files an example workflow
names, fetched into ComfyUI's models folders from a stand-in hub on 127.0.0.1 (tests/hub_server.py, reached
through HF_ENDPOINT as huggingface.co would be). Each file arrives whole or not at all, and two processes asking
for the same file fetch it once. Nothing reaches beyond 127.0.0.1."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import HubServer
from test_workflow_models import offered_entries
from workflow_shrink import WORKFLOWS, load

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "workflow_models.py"
SD15 = ("Comfy-Org/stable-diffusion-v1-5-archive", "v1-5-pruned-emaonly.safetensors")   # workflow 1's one file
MB = 1 << 20


@pytest.fixture(scope="module")
def wm():
    spec = importlib.util.spec_from_file_location("workflow_models_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(6 * MB)     # several of the stand-in hub's 1 MB chunks


@pytest.fixture
def hub(payload):
    with HubServer({SD15[0]: {SD15[1]: payload}}) as server:
        yield server


def hub_env(hub, tmp_path) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    return env


def files_under(root: Path) -> list[str]:
    return sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)


def body_gets(hub) -> int:
    return sum(1 for method, path, _ in hub.requests if method == "GET" and path.endswith("/" + SD15[1]))


def test_entries_are_what_the_frontend_offers(wm, tmp_path):
    """The same entries the frontend's missing-models list reads (tests/test_workflow_models.py), each at
    models/<directory>/<name>."""
    for name in WORKFLOWS:
        wf = load(name)
        expected = list(dict.fromkeys((m["directory"], m["name"]) for m in offered_entries(wf)))
        entries = wm.model_entries(wf)
        assert [(e["directory"], e["name"]) for e in entries] == expected, name
        for entry in entries:
            assert wm.target_path(tmp_path, entry) == tmp_path / entry["directory"] / entry["name"]
    assert wm.model_entries(load("linfusion_6_lora_2048.json"))    # the shipped ones name files at all


def test_entries_that_would_leave_the_models_folder_are_refused(wm, tmp_path):
    url = "https://huggingface.co/a/b/resolve/main/x.safetensors"
    for name, directory in (("../x.safetensors", "checkpoints"), ("x.safetensors", ".."), ("/etc/x", "loras"),
                            ("x.safetensors", "a/b"), (".hidden", "loras"), ("", "loras")):
        with pytest.raises(wm.ModelError, match="refused"):
            wm.target_path(tmp_path, {"name": name, "directory": directory, "url": url})
    with pytest.raises(wm.ModelError, match="no http"):
        wm.target_path(tmp_path, {"name": "x.safetensors", "directory": "loras", "url": "file:///etc/passwd"})


def test_hub_urls_are_read_as_repo_revision_and_file(wm):
    entry = load("linfusion_4_controlnet_2048.json")
    urls = {m["name"]: m["url"] for n in entry["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert wm.hub_file(urls["control_v11p_sd15_canny_fp16.safetensors"]) == (
        None, "comfyanonymous/ControlNet-v1-1_fp16_safetensors", "main", "control_v11p_sd15_canny_fp16.safetensors")
    assert wm.hub_file("https://huggingface.co/datasets/o/r/resolve/v1/sub/f.bin") == ("dataset", "o/r", "v1", "sub/f.bin")
    assert wm.hub_file("https://civitai.com/api/download/models/1") is None
    assert wm.hub_file("https://huggingface.co/o/r/blob/main/f.bin") is None


def test_models_command_fetches_a_workflows_files_once(hub, payload, tmp_path):
    """The README's command, through comfy_host.py (here with the test host's ComfyUI, COMFYUI_PATH)."""
    models = tmp_path / "models"
    cmd = [sys.executable, str(REPO / "scripts" / "comfy_host.py"), "models", "linfusion_1_sd15_txt2img_2048",
           "--models-dir", str(models)]
    done = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (models / "checkpoints" / SD15[1]).read_bytes() == payload
    assert files_under(models) == [f"checkpoints/{SD15[1]}"], "staging files or the lock were left behind"
    assert "fetched" in done.stdout and "MB" in done.stderr, "no progress was shown"
    assert body_gets(hub) == 1

    again = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already there" in again.stdout, again.stdout + again.stderr
    assert body_gets(hub) == 1, "a file already there was fetched again"


def test_a_cut_transfer_leaves_no_file_and_the_next_run_completes(hub, payload, tmp_path):
    models = tmp_path / "models"
    target = models / "checkpoints" / SD15[1]
    cmd = [sys.executable, str(SCRIPT), "linfusion_1_sd15_txt2img_2048", "--models-dir", str(models)]
    hub.faults[SD15[1]] = ("cut", 2 * MB)        # the connection drops after 2 MB, every time
    done = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stdout + done.stderr
    assert not target.exists()
    assert not [f for f in files_under(models) if not any(p.startswith(".") for p in Path(f).parts)], \
        f"a file ComfyUI would list was left: {files_under(models)}"

    del hub.faults[SD15[1]]
    done = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert target.read_bytes() == payload and files_under(models) == [f"checkpoints/{SD15[1]}"]


def test_two_processes_fetching_one_file_fetch_it_once(hub, payload, tmp_path):
    """A second process started while the first is mid-transfer waits on the lock beside the file, then finds
    the file whole and fetches nothing (the first is held at 1 MB until the second says it waits)."""
    models = tmp_path / "models"
    cmd = [sys.executable, str(SCRIPT), "linfusion_1_sd15_txt2img_2048", "--models-dir", str(models)]
    env = hub_env(hub, tmp_path)
    second: dict = {}

    def start_second_and_wait_for_it():
        if second:
            return
        proc = second["proc"] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True)
        lines = second["lines"] = []
        for line in proc.stdout:           # until it waits on the lock (or ends: then it did not wait)
            lines.append(line)
            if "waiting: another process is fetching" in line:
                return

    hub.faults[SD15[1]] = ("call", 1 * MB, start_second_and_wait_for_it)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    proc = second["proc"]
    rest, _ = proc.communicate(timeout=300)
    out = "".join(second["lines"]) + rest
    assert first.returncode == 0 and "fetched" in first.stdout, first.stdout + first.stderr
    assert proc.returncode == 0, out
    assert "waiting: another process is fetching" in out and "fetched by another process meanwhile" in out, out
    assert body_gets(hub) == 1, "both processes transferred the file"
    assert (models / "checkpoints" / SD15[1]).read_bytes() == payload
    assert files_under(models) == [f"checkpoints/{SD15[1]}"], "the lock or staging files were left behind"


def test_other_urls_are_fetched_whole_or_not_at_all(hub, payload, tmp_path):
    """A URL that is not the hub's goes through the standard library, with the same temp name + rename."""
    url = f"{hub.url}/{SD15[0]}/resolve/main/{SD15[1]}"
    workflow = tmp_path / "mine.json"
    workflow.write_text(json.dumps({"nodes": [], "models": [
        {"name": "mine.safetensors", "url": url, "directory": "loras"}]}))
    models = tmp_path / "models"
    cmd = [sys.executable, str(SCRIPT), str(workflow), "--models-dir", str(models)]
    hub.faults[SD15[1]] = ("cut", 3 * MB)
    done = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and files_under(models) == [], done.stdout + done.stderr + str(files_under(models))
    del hub.faults[SD15[1]]
    done = subprocess.run(cmd, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (models / "loras" / "mine.safetensors").read_bytes() == payload
    assert files_under(models) == ["loras/mine.safetensors"]


def test_the_lock_file_goes_with_the_lock(wm, tmp_path):
    target = tmp_path / "x.safetensors"
    with wm.file_lock(target):
        assert (tmp_path / ".x.safetensors.lock").exists()
    assert not list(tmp_path.iterdir())


def test_example_names_are_found_with_or_without_their_linfusion_prefix(wm):
    """The examples' file names start with `linfusion_` (so the Templates panel's search finds them); the names
    they had before, which older instructions give, still name the same file; an unknown name lists the examples."""
    new = wm.workflow_path("linfusion_1_sd15_txt2img_2048")
    assert new.name == "linfusion_1_sd15_txt2img_2048.json" and new.is_file()
    assert wm.workflow_path("1_sd15_txt2img_2048") == new == wm.workflow_path("1_sd15_txt2img_2048.json")
    with pytest.raises(wm.ModelError, match="linfusion_5_ipadapter"):
        wm.workflow_path("9_no_such_example")

"""The released LinFusion sets are downloaded when a prompt first uses them, through the real nodes in the
real executor, from a stand-in hub on 127.0.0.1 (tests/hub_server.py) that serves the SD 1.5 fixture files
as `Yuanshi/LinFusion-1-5`. models/linfusion is a temporary folder in every test: the shared fixtures folder
is never written. Nothing reaches beyond 127.0.0.1."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from comfy_harness import PromptFailed
from comfy_server import free_port
from hub_server import HubServer

RELEASE = "LinFusion-1-5"
REPO = "Yuanshi/LinFusion-1-5"
FILES = ("config.json", "diffusion_pytorch_model.safetensors")
WEIGHTS = FILES[1]


@pytest.fixture(scope="module")
def served(fixtures):
    """What the stand-in hub serves as Yuanshi/LinFusion-1-5: the SD 1.5 fixture folder's two files."""
    folder = fixtures.path("linfusion", fixtures.linfusion_folder["sd15"])
    return {name: folder / name for name in FILES}


@pytest.fixture
def root(host, tmp_path, monkeypatch):
    """models/linfusion for this test only, and the hub environment of a user with no token."""
    import comfy.model_management
    import folder_paths

    linfusion_root = tmp_path / "models_linfusion"
    linfusion_root.mkdir()
    exts = folder_paths.folder_names_and_paths["linfusion"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "linfusion", ([str(linfusion_root)], exts))
    monkeypatch.delitem(folder_paths.filename_list_cache, "linfusion", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    host.reset_cache()
    yield linfusion_root
    comfy.model_management.interrupt_current_processing(False)
    host.reset_cache()


@pytest.fixture
def hub(served, root, monkeypatch):
    with HubServer({REPO: dict(served)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def loader_prompt(name: str) -> dict:
    return {"lf": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": name}},
            "out": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["lf", 0]}}}


def choices(node: str = "LinFusionLoader") -> list[str]:
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]["linfusion_name"][0]


def leftovers(root) -> list[str]:
    """Every file under root, relative: partial or staged files would show up here."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def assert_installed(root, served, weights=None):
    for name in FILES:
        assert (root / RELEASE / name).read_bytes() == served[name].read_bytes()
    assert leftovers(root) == sorted(f"{RELEASE}/{n}" for n in FILES)   # no staging folder, no partials
    if weights is not None:
        expected = load_file(str(served[WEIGHTS]))
        assert weights.state_dict.keys() == expected.keys()
        assert all(torch.equal(weights.state_dict[k], expected[k]) for k in expected)
        assert weights.config_source == "config.json"


def test_released_set_is_downloaded_on_first_use_and_never_again(host, hub, root, served):
    offered = choices()
    # The plain names, so the value a shipped workflow holds is in the list before the download too.
    assert {"LinFusion-1-5", "LinFusion-2-1", "LinFusion-XL"} <= set(offered)
    assert not [c for c in offered if c.endswith(" (download)")], offered
    assert not hub.requests, "nothing is downloaded before a prompt runs"

    result = host.run(loader_prompt(RELEASE))
    assert_installed(root, served, result.captured["out"])
    total = sum(p.stat().st_size for p in served.values())
    bar = [(value, of) for node, value, of in result.progress if node == "lf"]
    assert bar and bar[-1] == (total, total) and len(bar) > 2, bar      # byte progress on the node
    assert {(m, p.split("/")[-1]) for m, p, _ in hub.requests if m == "GET"} == {("GET", n) for n in FILES}

    # Now on disk: listed once, and a saved workflow naming it (plain, or with the mark earlier versions listed)
    # runs without the hub.
    assert choices().count(RELEASE) == 1
    hub.requests.clear()
    before = {n: (root / RELEASE / n).stat().st_mtime_ns for n in FILES}
    for name in (RELEASE, f"{RELEASE} (download)"):
        host.reset_cache()
        again = host.run(loader_prompt(name))
        assert torch.equal(again.captured["out"].state_dict["0.to_q.weight"],
                           result.captured["out"].state_dict["0.to_q.weight"])
    assert not hub.requests
    assert {n: (root / RELEASE / n).stat().st_mtime_ns for n in FILES} == before


def test_existing_incomplete_folder_is_not_overwritten(host, hub, root, served):
    (root / RELEASE).mkdir()
    (root / RELEASE / "config.json").write_bytes(served["config.json"].read_bytes())
    assert choices().count(RELEASE) == 1
    err = host.run(loader_prompt(RELEASE), expect_error=True)
    assert isinstance(err, PromptFailed)
    assert str(root / RELEASE) in str(err) and WEIGHTS in str(err) and "not overwritten" in str(err)
    assert not hub.requests and leftovers(root) == [f"{RELEASE}/config.json"]


@pytest.mark.parametrize("failure", ["cancel", "network"])
def test_cancelled_or_broken_download_leaves_nothing_and_the_next_run_completes(host, hub, root, served, failure):
    import comfy.model_management

    half = served[WEIGHTS].stat().st_size // 2
    if failure == "cancel":   # the user presses Cancel while the weights are half-way
        hub.faults[WEIGHTS] = ("call", half, lambda: comfy.model_management.interrupt_current_processing(True))
    else:                     # the connection drops half-way and resuming makes no progress
        hub.faults[WEIGHTS] = ("cut", half)
    err = host.run(loader_prompt(RELEASE), expect_error=True)
    assert isinstance(err, PromptFailed)
    if failure == "cancel":
        assert "execution_interrupted" in str(err)
    else:
        assert REPO in str(err) and WEIGHTS in str(err) and "again" in str(err)
        assert any(r for m, p, r in hub.requests if m == "GET" and r), "huggingface_hub resumed with Range"
    assert not (root / RELEASE).exists()
    assert not [f for f in leftovers(root) if f.endswith(WEIGHTS) or f.endswith(".incomplete")], leftovers(root)

    hub.faults.clear()
    host.reset_cache()
    assert_installed(root, served, host.run(loader_prompt(RELEASE)).captured["out"])


@pytest.mark.parametrize("damage", ["truncated", "config_disagrees"])
def test_corrupt_download_is_rejected_and_deleted(host, root, served, monkeypatch, damage):
    files = {n: p.read_bytes() for n, p in served.items()}
    if damage == "truncated":      # served consistently short: the transfer itself succeeds
        files[WEIGHTS] = files[WEIGHTS][: len(files[WEIGHTS]) * 2 // 3]
        needle = "not a readable safetensors"
    else:
        config = json.loads(files["config.json"])
        config["modules_list"].pop()
        files["config.json"] = json.dumps(config).encode()
        needle = "do not belong together"
    with HubServer({REPO: files}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        err = host.run(loader_prompt(RELEASE), expect_error=True)
    assert isinstance(err, PromptFailed)
    assert "corrupt and was deleted" in str(err) and REPO in str(err) and needle in str(err)
    assert leftovers(root) == [] and os.listdir(root) == []


@pytest.mark.parametrize("why", ["offline", "unreachable"])
def test_offline_or_unreachable_hub_gives_instructions_and_writes_nothing(host, hub, root, monkeypatch, why):
    if why == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        endpoint = hub.url
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"   # nothing listens there
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    err = host.run(loader_prompt(f"{RELEASE} (download)"), expect_error=True)   # a value saved by earlier versions
    message = str(err)
    assert isinstance(err, PromptFailed)
    assert REPO in message and str(root / RELEASE) in message and f"{endpoint}/{REPO}/tree/main" in message
    assert all(name in message for name in FILES)
    assert (why == "offline") == ("HF_HUB_OFFLINE" in message)
    assert not hub.requests and os.listdir(root) == []


def test_auto_pick_downloads_the_release_for_the_checkpoint_family(host, hub, root, served, fixtures, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_linfusion_test_token")   # read when the download runs
    prompt = {"ckpt": {"class_type": "CheckpointLoaderLinFusion",
                       "inputs": {"ckpt_name": fixtures.checkpoint["sd15"], "linfusion_name": "auto (match the checkpoint)"}},
              "info": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ckpt", 3]}}}
    assert RELEASE in choices("CheckpointLoaderLinFusion")
    info = host.run(prompt).captured["info"]
    assert RELEASE in info and "SD1.x" in info and "7 of 7" in info
    assert_installed(root, served)
    assert hub.authorizations and set(hub.authorizations) == {"Bearer hf_linfusion_test_token"}

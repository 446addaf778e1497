"""The launcher, end to end on the CPU: `scripts/comfy_host.py serve --gpus 2 --cpu` starts two real ComfyUI
servers (gloo ranks); prompts go to rank 0's HTTP API only, as from its UI.

One launch runs, in order: the graph with the `distributed` switches of the Tiled UNet and of the tiled VAE
decode and encode on (A), the same graph with them off (B, the single-process reference, in the same rank-0
process), a long prompt cancelled through rank 0's POST /interrupt while it samples (C), then another distributed
prompt (D). The tests read what it recorded. SD 1.5 fixture checkpoint (random weights, real architecture) with
LinFusion, 128 x 96 px, UNet tile 8, VAE tile 64 px, fp32; the sampled latent is saved, and the image the tiled
VAE decodes from it is saved encoded again by the tiled VAE (SaveLatent keeps every bit; an image file would not).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from comfy_server import comfy_server, free_port, get_json

REPO = Path(__file__).resolve().parent.parent
EXACT = 1e-5

pytestmark = pytest.mark.slow


def graph(fixtures, *, distributed, seed, steps, prefix):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": fixtures.linfusion_folder["sd15"]}},
        "5": {"class_type": "ApplyLinFusion", "inputs": {"model": ["1", 0], "linfusion": ["4", 0],
                                                         "blocks": "all", "min_tokens": 0}},
        "6": {"class_type": "LinFusionTiledUNet", "inputs": {"model": ["5", 0], "tile_size": 8, "park_device": "cpu",
                                                             "mode": "exact", "distributed": distributed}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["7", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}},
        "10": {"class_type": "LinFusionVAEDecodeTiled", "inputs": {"samples": ["8", 0], "vae": ["1", 2], "tile_size": 64,
                                                                   "park_device": "cpu", "distributed": distributed}},
        "11": {"class_type": "LinFusionVAEEncodeTiled", "inputs": {"pixels": ["10", 0], "vae": ["1", 2], "tile_size": 64,
                                                                   "park_device": "cpu", "distributed": distributed}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix + "_vae"}},
    }


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}") if r.status == 200 and path == "/prompt" else None


def wait_history(base, prompt_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = get_json(f"{base}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish on {base} in {timeout} s")


def wait_for(path, pattern, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, path.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def latent(output_dir, entry, node="9"):
    from safetensors.torch import load_file
    item = entry["outputs"][node]["latents"][0]
    return load_file(str(Path(output_dir) / item["subfolder"] / item["filename"]))["latent_tensor"]


def events(entry):
    return [m[0] for m in entry["status"]["messages"]]


@pytest.fixture(scope="module")
def launch(fixtures, tmp_path_factory):
    assert os.environ.get("COMFYUI_PATH"), "run through scripts/comfy_host.py test"
    tmp = tmp_path_factory.mktemp("distributed_serve")
    base_dir = tmp / "base"
    (base_dir / "models").mkdir(parents=True)
    for kind, unit, name in (("checkpoints", "checkpoint", fixtures.checkpoint["sd15"]),
                             ("linfusion", "linfusion", fixtures.linfusion_folder["sd15"])):
        # the fixture files, as a user's models folder holds them
        (base_dir / "models" / kind).symlink_to(Path(fixtures.path(unit, name)).parent)
    port = free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "comfy_host.py"), "serve", "--gpus", "2", "--cpu",
           "--base-directory", str(base_dir), "--disable-auto-launch", "--disable-api-nodes",
           "--database-url", "sqlite:///:memory:", "--listen", "127.0.0.1", "--port", str(port)]
    log0 = tmp / "serve.log"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {}
    with comfy_server(cmd, port, env=env, log_path=log0, startup_timeout=400) as base:
        m = wait_for(log0, r"rank 1: ComfyUI on 127\.0\.0\.1:(\d+), log (\S+)")[0]
        base1, log1 = f"http://127.0.0.1:{m[0]}", Path(m[1])
        out1 = log1.parent / "rank1" / "output"
        get_json(base1 + "/system_stats")   # the follower serves its own API on 127.0.0.1

        def run(name, **kw):
            pid = post(base, "/prompt", {"prompt": graph(fixtures, prefix=name, **kw), "client_id": "test"})["prompt_id"]
            return pid, wait_history(base, pid), wait_history(base1, pid)

        for name, kw in (("A", dict(distributed=True, seed=1, steps=2)),
                         ("B", dict(distributed=False, seed=1, steps=2))):
            pid, e0, e1 = run(name, **kw)
            out[name] = dict(pid=pid, e0=e0, e1=e1, l0=latent(base_dir / "output", e0), l1=latent(out1, e1),
                             v0=latent(base_dir / "output", e0, "12"), v1=latent(out1, e1, "12"))

        # C: long sampling, cancelled from rank 0 once both ranks are inside it (its first UNet call is done)
        split = r"rank 1 of 2 computed \d+ tile steps"
        before = len(re.findall(split, log1.read_text()))
        pid = post(base, "/prompt", {"prompt": graph(fixtures, distributed=True, seed=3, steps=60, prefix="C"),
                                     "client_id": "test"})["prompt_id"]
        while len(re.findall(split, log1.read_text())) <= before:
            assert not get_json(f"{base}/history/{pid}"), "the long prompt ended before it was cancelled"
            time.sleep(0.05)
        post(base, "/interrupt", {})       # what the UI's cancel button sends (a global interrupt)
        out["C"] = dict(pid=pid, e0=wait_history(base, pid, 300), e1=wait_history(base1, pid, 300))

        pid, e0, e1 = run("D", distributed=True, seed=2, steps=2)
        out["D"] = dict(pid=pid, e0=e0, e1=e1, l0=latent(base_dir / "output", e0), l1=latent(out1, e1),
                        v0=latent(base_dir / "output", e0, "12"), v1=latent(out1, e1, "12"))
        out["log0"], out["log1"] = log0.read_text(errors="replace"), log1.read_text(errors="replace")
    return out


def test_distributed_serve_image_equals_single_process(launch):
    a, b = launch["A"], launch["B"]
    for e in (a["e0"], a["e1"], b["e0"], b["e1"]):
        assert e["status"]["status_str"] == "success", e["status"]
    # rank 0 and rank 1 ran rank 0's prompt under the same id, each split its UNet calls
    for log, rank in ((launch["log0"], 0), (launch["log1"], 1)):
        steps = [int(n) for n in re.findall(rf"rank {rank} of 2 computed (\d+) tile steps", log)]
        assert steps and all(n > 0 for n in steps), f"rank {rank} did not split a UNet call"
    ref = b["l0"]
    err = ((a["l0"] - ref).abs().max() / ref.abs().max()).item()
    print(f"distributed vs single process: max rel err {err:.2e}, bitwise {torch.equal(a['l0'], ref)}")
    assert torch.equal(a["l0"], ref), f"not bitwise the single-process Tiled UNet (max rel err {err:.2e})"
    assert err <= EXACT
    assert torch.equal(a["l1"], a["l0"]), "the follower's latent differs from rank 0's"


def test_distributed_serve_tiled_vae_equals_single_process(launch):
    """The tiled VAE nodes' `distributed` switch: both ranks split the decode and the encode, and the image they
    decode, encoded again, is bitwise the single-process nodes' on both ranks."""
    a, b = launch["A"], launch["B"]
    for op in ("decode", "encode"):
        for log, rank in ((launch["log0"], 0), (launch["log1"], 1)):
            tiles = [int(n) for n in re.findall(rf"distributed tiled VAE {op}: rank {rank} of 2 computed (\d+) tiles",
                                                log)]
            assert tiles and all(n > 0 for n in tiles), f"rank {rank} did not split a VAE {op}"
    ref = b["v0"]
    assert ref.abs().max() > 0
    err = ((a["v0"] - ref).abs().max() / ref.abs().max()).item()
    print(f"distributed tiled VAE decode + encode vs single process: max rel err {err:.2e}")
    assert torch.equal(a["v0"], ref), f"not bitwise the single-process tiled VAE (max rel err {err:.2e})"
    assert torch.equal(a["v1"], a["v0"]), "the follower's decoded image differs from rank 0's"


def test_distributed_serve_cancel_stops_every_rank_and_the_next_prompt_runs(launch):
    c, d = launch["C"], launch["D"]
    for k in ("e0", "e1"):
        assert "execution_interrupted" in events(c[k]), f"{k}: {events(c[k])}"
        stopped = next(m[1] for m in c[k]["status"]["messages"] if m[0] == "execution_interrupted")
        assert stopped["node_type"] == "KSampler", stopped
    where = {r: re.findall(rf"rank {r}: cancelled at distributed call (\d+) of prompt {c['pid']} \(tiled UNet\), (.*)",
                           launch[f"log{r}"])
             for r in (0, 1)}
    print(f"cancel checkpoints: {where}")
    if where[0] and where[1]:     # both stopped inside the UNet: at the same checkpoint
        assert where[0] == where[1]
    for k in ("e0", "e1"):
        assert d[k]["status"]["status_str"] == "success", d[k]["status"]
    assert torch.equal(d["l0"], d["l1"]) and torch.equal(d["v0"], d["v1"])
    assert "DistributedFault" not in launch["log0"] + launch["log1"]


def test_distributed_switch_missing_from_an_older_workflow_keeps_it_off(host):
    """Workflow 2 as saved before the switches existed (the Tiled UNet's 3 widget values, the tiled VAE decode's
    2): as the frontend loads it each switch takes its default, ComfyUI's validation accepts the prompt (the
    inputs are optional), and the nodes run one process."""
    import asyncio

    import execution
    from workflow_convert import live_object_info, workflow_to_api
    from workflow_shrink import load

    defs = live_object_info()
    wf = load("linfusion_2_sd15_16k_ladder.json")
    nodes = [n for n in wf["nodes"] if n["type"] in ("LinFusionTiledUNet", "LinFusionVAEDecodeTiled")]
    assert sorted(n["type"] for n in nodes) == ["LinFusionTiledUNet", "LinFusionVAEDecodeTiled"]
    for node in nodes:
        assert node["widgets_values"][-1] is False
        node["widgets_values"] = node["widgets_values"][:-1]
    prompt = workflow_to_api(wf, defs, strict=False)
    for node in nodes:
        inputs = prompt[str(node["id"])]["inputs"]
        assert inputs["distributed"] is False, node["type"]
        del inputs["distributed"]          # an API-format prompt written before the switch
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("old-workflow", prompt, None))
    for node in nodes:
        assert str(node["id"]) not in node_errors, node_errors[str(node["id"])]


def test_distributed_switch_without_the_launcher_is_a_clear_error(host, core):
    import importlib
    nodes = importlib.import_module(host.extension_module.__name__ + ".nodes.tiled_unet")
    model = type("M", (), {"clone": lambda self: self})()
    with pytest.raises(RuntimeError, match=r"not started by the launcher.*serve --gpus N"):
        nodes.LinFusionTiledUNet().patch(model, 64, "cpu", "exact", distributed=True)


def test_distributed_vae_switch_without_the_launcher_is_a_clear_error(host, core):
    """The tiled VAE nodes: an error naming the launcher, before any VAE work (no image from one process)."""
    import importlib
    nodes = importlib.import_module(host.extension_module.__name__ + ".nodes.tiled_vae")
    latent_in = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(RuntimeError, match=r"tiled VAE: 'distributed' is on.*not started by the launcher.*"
                                           r"comfy_host\.py serve --gpus N"):
        nodes.LinFusionVAEDecodeTiled().decode(latent_in, None, 64, "cpu", distributed=True)
    with pytest.raises(RuntimeError, match=r"tiled VAE: 'distributed' is on.*serve --gpus N"):
        nodes.LinFusionVAEEncodeTiled().encode(torch.zeros(1, 64, 64, 3), None, 64, "cpu", distributed=True)

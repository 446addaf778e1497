"""The two user-facing ways in: the README's main-job command, and a `git clone` into custom_nodes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_server import comfy_server, free_port, get_json

REPO = Path(__file__).resolve().parent.parent
OUR_CATEGORY = "LinFusion"

pytestmark = pytest.mark.slow


def our_nodes(object_info: dict) -> dict:
    return {k: v for k, v in object_info.items() if v.get("python_module", "").endswith("ComfyUI-LinFusion")
            or v.get("category", "").startswith(OUR_CATEGORY)}


def test_main_job_serves_comfyui_with_extension(tmp_path):
    """`python3 scripts/comfy_host.py serve` starts ComfyUI on 127.0.0.1 with this extension loaded."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "comfy_host.py"), "serve",
           "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    with comfy_server(cmd, port, log_path=tmp_path / "serve.log") as base:
        stats = get_json(base + "/system_stats")
        assert stats["system"]["comfyui_version"]
        info = get_json(base + "/object_info")
        assert our_nodes(info), "the served ComfyUI has none of our nodes"
    log = (tmp_path / "serve.log").read_text()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "ComfyUI-LinFusion" in l)


def test_git_clone_install_into_fresh_host(tmp_path):
    """README route: git clone into custom_nodes (requirements.txt, which ComfyUI-Manager installs and which lists
    only what ComfyUI already brings, installs cleanly too), then every node of ours shows in the UI with a
    category, a description and a tooltip on every input."""
    comfy = Path(os.environ["COMFYUI_PATH"])
    base_dir = tmp_path / "base"
    (base_dir / "custom_nodes").mkdir(parents=True)
    clone = base_dir / "custom_nodes" / "ComfyUI-LinFusion"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(clone / "requirements.txt")], check=True)
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--base-directory", str(base_dir),
           "--listen", "127.0.0.1", "--port", str(port)]
    with comfy_server(cmd, port, cwd=comfy, log_path=tmp_path / "clone.log") as base:
        info = get_json(base + "/object_info")
    assert (base_dir / "models" / "linfusion").is_dir(), "models/linfusion was not created at start"
    ours = our_nodes(info)
    assert ours, "the cloned extension registered no nodes"
    for name, node in ours.items():
        assert node["category"].startswith(OUR_CATEGORY), name
        assert node.get("description"), f"{name} has no description"
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"

"""Ready for the Comfy Registry (docs/publishing.md): pyproject.toml's fields as comfy-cli 1.23.0 reads them, the
archive `comfy node pack` would build (git-tracked files less .comfyignore), the ruff rules `comfy node validate`
runs, and the publish workflow. comfy-cli itself is not installed here; what it does is restated from its source:
validate runs `ruff check . -q --select S102,S307,E702 --exit-zero` (exec, eval, two statements on a line: "soon an
error"), pack matches .comfyignore with pathspec's "gitwildmatch"."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from ci_rules import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VALIDATE_RULES = "S102,S307,E702"
# comfy-cli 1.23.0's registry/config_parser.py: what it accepts (anything else is dropped with a warning).
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if done.returncode or not done.stdout.strip():
        skip_or_fail(f"not a git checkout (git ls-files: {done.stderr.strip()}): what ships is its tracked files")
    return done.stdout.splitlines()


def shipped_files() -> list[str]:
    """What `comfy node pack` puts into the archive: tracked files that no .comfyignore line matches."""
    try:
        import pathspec
    except ImportError:
        skip_or_fail("pathspec is not installed (tests/requirements.txt)")
    lines = [l.strip() for l in (REPO / ".comfyignore").read_text().splitlines()]
    with warnings.catch_warnings():     # newer pathspec deprecates the name comfy-cli uses
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", [l for l in lines if l and not l.startswith("#")])
    return [f for f in tracked_files() if not spec.match_file(f)]


def test_pyproject_has_what_the_registry_reads():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (REPO / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"] == "https://github.com/comfyui-linfusion/ComfyUI-LinFusion"
    assert comfy["PublisherId"] == "comfyui-linfusion" and comfy["DisplayName"] == "ComfyUI-LinFusion"
    # The oldest ComfyUI CI runs (scripts/comfy_host.py's OLDEST), in a form comfy-cli keeps.
    assert comfy["requires-comfyui"] == ">=0.3.75"
    assert all(VERSION_PART.match(part.strip()) for part in comfy["requires-comfyui"].split(","))
    classifiers = project["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    for c in classifiers:
        if c.startswith("Operating System :: "):
            assert c.removeprefix("Operating System :: ").startswith(OS_PREFIXES), c
        elif c.startswith("Environment :: "):
            assert c.removeprefix("Environment :: ") in ACCELERATORS, c
    assert set(comfy) <= {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui", "Banner", "web",
                          "Models"}, "a [tool.comfy] key comfy-cli does not read"


def test_dependencies_are_requirements_txt():
    lines = [l.split("#", 1)[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    assert PYPROJECT["project"]["dependencies"] == [l for l in lines if l]
    assert not [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]


def test_registry_id_is_the_one_the_workflows_name():
    """The node id ([project].name) is what the example workflows' nodes carry as cnr_id, by which ComfyUI's
    frontend names the pack a missing node comes from."""
    source = (REPO / "scripts" / "example_workflows.py").read_text()
    assert f'"ours": "{PYPROJECT["project"]["name"]}"' in source
    ours = set()
    for path in (REPO / "example_workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"].startswith("LinFusion"):
                ours.add(node.get("properties", {}).get("cnr_id"))
    assert ours == {PYPROJECT["project"]["name"]}


def test_the_archive_ships_the_extension_and_no_development_files():
    shipped = shipped_files()
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                   "scripts/workflow_models.py", "docs/workflow_sd15_txt2img_2048.png"):
        assert needed in shipped, needed
    for folder in ("nodes/", "linfusion_core/"):
        tracked = [f for f in tracked_files() if f.startswith(folder)]
        assert tracked and set(tracked) <= set(shipped), folder
    workflows = [f for f in tracked_files() if f.startswith("example_workflows/")]
    assert any(f.endswith(".json") for f in workflows) and any(f.endswith(".jpg") for f in workflows)
    assert set(workflows) <= set(shipped), "the example workflows and their thumbnails must ship"
    assert {f for f in tracked_files() if f.startswith("docs/") and f.endswith(".md")} <= set(shipped)
    for f in shipped:
        assert not f.startswith(("tests/", "bench/", ".ci/", ".github/")), f
        assert not (f.startswith("docs/") and f.endswith((".json", ".jsonl", ".txt"))), f
    # What ships runs without what does not: no shipped module imports tests/, bench/ or the dev scripts.
    for f in shipped:
        if f.endswith(".py"):
            text = (REPO / f).read_text()
            assert not re.search(r"^\s*(from|import)\s+(tests|bench|comfy_harness|workflow_build)\b", text, re.M), f


def test_validates_without_warnings():
    """`comfy node validate`'s own ruff run, over every tracked file (what ships and more), failing on a warning
    instead of printing it."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        skip_or_fail("ruff is not installed (tests/requirements.txt)")
    py_files = [f for f in tracked_files() if f.endswith(".py")]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--no-cache", "--select", VALIDATE_RULES,
                           *py_files], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_publish_workflow_runs_upstream_on_a_tag():
    import yaml

    wf = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    on = wf.get("on", wf.get(True))     # YAML 1.1 reads a bare `on` as true
    assert list(on) == ["push"] and on["push"] == {"tags": ["v*"]}
    (job,) = wf["jobs"].values()
    assert job["if"] == "github.repository == 'comfyui-linfusion/ComfyUI-LinFusion'"
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "comfy-cli==1.23.0" in runs and "node publish --token" in runs
    assert f"--select {VALIDATE_RULES}" in runs
    assert "secrets.REGISTRY_ACCESS_TOKEN" in json.dumps(job["steps"])

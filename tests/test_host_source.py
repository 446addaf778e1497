"""Where scripts/comfy_host.py gets ComfyUI 0.33 on a machine without ../shared/hosts/ (a user's clone): upstream
at the pinned commit (COMFYUI_UPSTREAM), fetched with git and checked by its commit id, before any venv or torch
work; offline it fails in seconds, naming the commit and the other ways, with nothing left behind.

Nothing here reaches beyond this machine: git may use local files only (GIT_ALLOW_PROTOCOL=file) and pip no index
(PIP_NO_INDEX), so the upstream URL fails as it would offline. The stand-in for upstream is a local git repository
made from the shared archive. Its commit id cannot be upstream's (the archive lacks two tokenizer files, and a
commit id also hashes author, date and parents), and a tree id would not match upstream's either for the same
reason, so the tests pin the local repository's own commit with LINFUSION_COMFYUI_COMMIT: the same check of the
checked-out commit id then runs as against upstream."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ci_rules import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "hosts" / "comfyui-0.33.0.tar.gz"
HOST_VARS = ("COMFYUI_PATH", "COMFYUI_PYTHON", "LINFUSION_HOST_DIR", "LINFUSION_HOST_DIR_033", "LINFUSION_TORCH_DIR",
             "LINFUSION_TORCH_SPEC", "LINFUSION_COMFYUI_SOURCE", "LINFUSION_COMFYUI_COMMIT")


@pytest.fixture(scope="module")
def comfy_host():
    spec = importlib.util.spec_from_file_location("comfy_host_source_test", REPO / "scripts" / "comfy_host.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def git(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid", GIT_AUTHOR_DATE="2026-08-22T00:00:00Z",
               GIT_COMMITTER_DATE="2026-08-22T00:00:00Z")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> tuple[Path, str]:
    """A local git repository of ComfyUI 0.33.0 (from the shared archive) and its pinned commit, with one more
    commit on top: the branch head is not the pinned commit, as upstream's master has moved on."""
    if not ARCHIVE.is_file():
        skip_or_fail(f"{ARCHIVE} is missing: the local stand-in for upstream ComfyUI is made from it")
    root = tmp_path_factory.mktemp("comfyui_mirror")
    with tarfile.open(ARCHIVE) as tf:
        tf.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    repo = root / "ComfyUI"
    git("init", "-q", cwd=repo)
    git("add", "-A", "--force", cwd=repo)       # all of it: upstream tracks files its .gitignore names (custom_nodes/...)
    git("commit", "-q", "-m", "ComfyUI 0.33.0", cwd=repo)
    pinned = git("rev-parse", "HEAD", cwd=repo)
    (repo / "LATER_COMMIT").write_text("not in the pinned commit\n")
    git("add", "LATER_COMMIT", cwd=repo)
    git("commit", "-q", "-m", "later", cwd=repo)
    return repo, pinned


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in HOST_VARS}
    return dict(env, GIT_ALLOW_PROTOCOL="file", PIP_NO_INDEX="1", **extra)


def test_the_pin_is_one_full_commit_of_upstream(comfy_host):
    pin = comfy_host.COMFYUI_UPSTREAM
    assert pin.url == "https://github.com/Comfy-Org/ComfyUI" and re.fullmatch(r"[0-9a-f]{40}", pin.commit)
    assert comfy_host.HOSTS["0.33"].git is pin
    notes = ARCHIVE.parent / "README.md"
    if notes.is_file():     # the archive's own notes name the commit it repacks
        assert pin.commit in notes.read_text()


@pytest.mark.parametrize("command", ["serve", "test"])
def test_without_archive_and_offline_it_fails_at_once_leaving_nothing(tmp_path, command):
    """A clone without ../shared: `serve` and `test` (which would build 0.3.75 and torch first) stop before any
    venv or torch work, with the URL, the commit and the other ways in the message."""
    checkout = tmp_path / "ComfyUI-LinFusion"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "comfy_host.py", checkout / "scripts")
    done = subprocess.run([sys.executable, "scripts/comfy_host.py", command], cwd=checkout, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    for needed in ("https://github.com/Comfy-Org/ComfyUI", "783545f689a0af730065994b46b382ae24844c99",
                   "--host 0.3.75", "COMFYUI_PATH", "LINFUSION_COMFYUI_SOURCE", "Nothing was installed"):
        assert needed in out, f"{needed!r} not in:\n{out}"
    assert sorted(p.name for p in checkout.iterdir()) == ["scripts"], "something was left behind"


def test_from_a_mirror_the_pinned_commit_is_checked_out(comfy_host, mirror, tmp_path, monkeypatch, capsys):
    repo, pinned = mirror
    host = comfy_host.HOSTS["0.33"]
    for var in HOST_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LINFUSION_HOST_DIR_033", str(tmp_path / "h033"))
    monkeypatch.setenv("LINFUSION_COMFYUI_SOURCE", str(repo))
    monkeypatch.setenv("LINFUSION_COMFYUI_COMMIT", pinned)
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "file")
    target = comfy_host.install_comfyui(host)
    assert target == tmp_path / "h033" / "ComfyUI"
    assert git("rev-parse", "HEAD", cwd=target) == pinned
    assert not (target / "LATER_COMMIT").exists(), "the branch head was checked out, not the pinned commit"
    assert '"0.33.0"' in (target / "comfyui_version.py").read_text()
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and ".git" not in p.parts)
    assert files == sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                           if p.is_file() and ".git" not in p.parts and p.name != "LATER_COMMIT")
    assert (target / "custom_nodes").is_dir() and (target / "input" / "example.png").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["ComfyUI", "comfyui.stamp"]
    capsys.readouterr()
    assert comfy_host.install_comfyui(host) == target
    assert "fetching" not in capsys.readouterr().out, "a finished install was fetched again"


def test_a_commit_the_source_lacks_fails_and_leaves_nothing(comfy_host, mirror, tmp_path, monkeypatch):
    repo, _ = mirror
    for var in HOST_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LINFUSION_HOST_DIR_033", str(tmp_path / "h033"))
    monkeypatch.setenv("LINFUSION_COMFYUI_SOURCE", str(repo))
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "file")
    # The real pin: the local stand-in does not hold upstream's commit.
    with pytest.raises(SystemExit, match=comfy_host.COMFYUI_UPSTREAM.commit) as e:
        comfy_host.install_comfyui(comfy_host.HOSTS["0.33"])
    assert "LINFUSION_COMFYUI_SOURCE" in str(e.value.code)
    assert not (tmp_path / "h033").exists()
    monkeypatch.setenv("LINFUSION_COMFYUI_COMMIT", "783545f")      # an abbreviation would not pin anything
    with pytest.raises(SystemExit, match="not a full commit id"):
        comfy_host.install_comfyui(comfy_host.HOSTS["0.33"])
    assert not (tmp_path / "h033").exists()


def test_a_cpu_machine_is_told_of_the_smaller_torch(comfy_host, tmp_path, monkeypatch, capsys):
    """Before the default torch (CUDA libraries included) goes in on Linux without an NVIDIA driver. The install
    itself fails here at once: pip may use no index."""
    monkeypatch.setattr(comfy_host, "nvidia_driver", lambda: False)
    monkeypatch.setattr(comfy_host.sys, "platform", "linux")
    monkeypatch.setattr(comfy_host, "TORCH_SPEC", comfy_host.DEFAULT_TORCH_SPEC.split())
    monkeypatch.setenv("LINFUSION_TORCH_DIR", str(tmp_path / "torch"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(subprocess.CalledProcessError):
        comfy_host.torch_layer()
    out = capsys.readouterr().out
    assert "LINFUSION_TORCH_SPEC='torch==2.14.1+cpu torchvision==0.29.1+cpu'" in out and "much smaller" in out, out
    monkeypatch.setattr(comfy_host, "nvidia_driver", lambda: True)
    assert comfy_host.cpu_torch_hint() is None

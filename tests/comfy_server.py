"""Start a real ComfyUI server process on 127.0.0.1 for tests that talk to it over HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def comfy_server(cmd: list[str], port: int, *, cwd: Path | None = None, env: dict | None = None,
                 log_path: Path | None = None, startup_timeout: float = 240.0):
    """Run `cmd` (which must serve ComfyUI on 127.0.0.1:`port`) until /object_info answers; stop it after."""
    log = open(log_path, "w+") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode} before answering; log: {log_path}")
            try:
                get_json(base + "/system_stats", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer on {base} in {startup_timeout}s; log: {log_path}")
                time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def host_python() -> str:
    """The Python of the host environment the tests run in."""
    return sys.executable

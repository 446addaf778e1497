"""Temporary folders for the whole process (ComfyUI serves from them, imported modules live in them, so they
must outlive the code that made them, and go when the process ends: hundreds had piled up in /tmp), and the
tarball unpacking that fills them."""
from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new folder under the system temp folder, removed when this process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def unpack_tar(tarball: Path, target: Path) -> None:
    """Unpack with the "data" filter (no links out of target, no device files) where this Python has it
    (3.10.12+, 3.11.4+); older patch releases lack the argument, and the tarballs here are our own snapshots."""
    with tarfile.open(tarball) as tf:
        tf.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))

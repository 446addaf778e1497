"""Temporary folders for the whole process: ComfyUI serves from them, imported modules live in them, so they
must outlive the code that made them, and go when the process ends (hundreds of them had piled up in /tmp)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new folder under the system temp folder, removed when this process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path

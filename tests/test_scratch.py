"""tests/scratch.py: temp folders gone when the process ends, and tarballs unpacked on every Python 3.10/3.11
patch release (the "data" filter only where the Python has it)."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scratch import unpack_tar


def _tarball(path: Path, link_target: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        data = b"pack source"
        info = tarfile.TarInfo("pack/__init__.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        if link_target:
            link = tarfile.TarInfo("pack/escape")
            link.type, link.linkname = tarfile.SYMTYPE, link_target
            tf.addfile(link)
    return path


def test_scratch_dir_is_removed_when_the_process_exits():
    code = "from scratch import scratch_dir; p = scratch_dir('linfusion-test-'); (p / 'f').write_text('x'); print(p)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True)
    made = Path(out.stdout.strip())
    assert made.name.startswith("linfusion-test-") and not made.exists()


def test_unpack_tar_filters_where_python_can(tmp_path):
    evil = _tarball(tmp_path / "evil.tar.gz", "/etc/passwd")
    if hasattr(tarfile, "data_filter"):
        with pytest.raises(tarfile.FilterError):
            unpack_tar(evil, tmp_path / "out")
    else:   # 3.10.11 / 3.11.3 and older: no filter to apply; the link is unpacked as it is
        unpack_tar(evil, tmp_path / "out")
        assert (tmp_path / "out" / "pack" / "escape").is_symlink()


def test_unpack_tar_works_on_a_python_without_the_filter(tmp_path, monkeypatch):
    """As on Debian's Python 3.11.2: no tarfile.data_filter, and extractall() takes no `filter` argument."""
    real = tarfile.TarFile.extractall
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}   # the old behaviour

    def old_extractall(self, path=".", members=None, *, numeric_owner=False):
        return real(self, path, members, numeric_owner=numeric_owner, **trusted)
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    unpack_tar(_tarball(tmp_path / "pack.tar.gz"), tmp_path / "out")
    assert (tmp_path / "out" / "pack" / "__init__.py").read_bytes() == b"pack source"

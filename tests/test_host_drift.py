"""The ComfyUI drift guard: each internal this extension mirrors or swaps (tests/host_drift.json) must be, on the
running ComfyUI, one of the versions the extension was written against. A ComfyUI that changes one fails here,
naming it, the files of ours that depend on it and how to update, before a user meets the difference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import host_drift

REPO = Path(__file__).resolve().parent.parent
PIECES = host_drift.pieces()


def drift_failure(piece: dict) -> str | None:
    """None when the running ComfyUI's fingerprint of the piece is in the record, else what to do about it."""
    found = host_drift.fingerprint(piece)
    if host_drift.known_entry(piece, found) is not None:
        return None
    name, version, files = piece["name"], host_drift.comfyui_version(), ", ".join(piece["files"])
    recorded = ", ".join(v for entry in piece["known"] for v in entry["comfyui"])
    found_text = (f"is missing from ComfyUI {version}" if found is None else
                  f"({piece['guard']}) in ComfyUI {version} differs from every recorded version (sha256 "
                  f"{found[:16]}, at {host_drift.where(name)})")
    return (f"{name} {found_text}; recorded: ComfyUI {recorded}.\n"
            f"Ours depending on it ({files}): {piece['why']}\n"
            f"Read the new source, adapt {files} to it, then add its fingerprint (never removes one):\n"
            f"    {host_drift.record_command([name], os.environ.get('LINFUSION_HOST'))}")


@pytest.mark.parametrize("piece", PIECES, ids=[p["name"] for p in PIECES])
def test_host_matches_record(host, piece):
    failure = drift_failure(piece)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_a_changed_piece_fails_by_name(host):
    """The guard itself: an unrecorded fingerprint, and a piece the host lacks, fail with the name and the way out."""
    piece = next(p for p in PIECES if p["name"].endswith("UNetModel._forward"))
    changed = {**piece, "known": [{"sha256": "0" * 64, "comfyui": ["0.0.0"]}]}
    message = drift_failure(changed)
    assert message is not None and message.startswith(piece["name"] + " (source) in ComfyUI "), message
    assert host_drift.comfyui_version() in message and "recorded: ComfyUI 0.0.0" in message
    assert all(f in message for f in piece["files"]) and "tests/host_drift.py --record " + piece["name"] in message
    gone = {**changed, "name": "comfy.ops.no_such_op"}
    assert drift_failure(gone).startswith("comfy.ops.no_such_op is missing from ComfyUI ")


def test_only_code_changes_count():
    cosmetic = '''
        def f(self, x):
            """Doc."""
            # why
            y = x + 1  # how

            return y
    '''
    code = 'def f(self, x):\n    y = x + 1\n    return y\n'
    assert host_drift.normalise(cosmetic) == host_drift.normalise(code) == code
    assert host_drift.normalise(code.replace("+ 1", "+ 2")) != host_drift.normalise(code)
    hashed = 'def f():\n    return "# not a comment"\n'
    assert host_drift.normalise(hashed) == hashed


def test_record_is_complete():
    names = [p["name"] for p in PIECES]
    documented = (REPO / "docs" / "host_drift.md").read_text(encoding="utf-8")
    assert len(names) == len(set(names)), "a piece is listed twice"
    for piece in PIECES:
        assert piece["guard"] in host_drift.GUARDS, piece["name"]
        assert piece["known"] and piece["why"], f"{piece['name']}: no known fingerprint or no reason"
        missing = [f for f in piece["files"] if not (REPO / f).is_file()]
        assert piece["files"] and not missing, f"{piece['name']}: files {missing} do not exist (renamed?)"
        assert f"`{piece['name']}`" in documented, f"{piece['name']} is not in docs/host_drift.md's table"

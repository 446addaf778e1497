"""Fingerprints of the ComfyUI internals this extension mirrors or swaps, and the record of the ones it was
written against (host_drift.json; docs/host_drift.md says what is guarded and why).

A piece is guarded by its source text ("source": the code, with comments, docstrings, blank lines and the
indentation of the whole block left out, so only a change of code counts) or by its call signature only
("signature": parameter names, kinds, order and defaults, without annotations) where we only stand in for it.
A piece this ComfyUI does not have has the fingerprint None (recorded as null).

After reading a change and adapting our code to it, add this host's fingerprints to the record (never removes):

    python3 scripts/comfy_host.py python --host 0.33 tests/host_drift.py --record [NAME ...]

(no NAME: every piece in the record; a new piece is added to host_drift.json by hand, then recorded).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
import textwrap
import tokenize
from pathlib import Path

RECORD = Path(__file__).with_name("host_drift.json")
GUARDS = ("source", "signature")
_ABSENT = object()


def load_record() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def pieces() -> list[dict]:
    return load_record()["pieces"]


def record_command(names=(), host: str | None = None) -> str:
    host_arg = [f"--host {host}"] if host else []
    return " ".join(["python3 scripts/comfy_host.py python", *host_arg, "tests/host_drift.py --record", *names])


def resolve(name: str):
    """The object at a dotted name (a module path, then attributes), or None when this ComfyUI has none."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (module_name + ".").startswith(e.name + "."):
                continue   # no such module: the name goes on with attributes
            raise          # a module that exists failed to import: not this piece's absence
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _ABSENT)
            if obj is _ABSENT:
                return None
        return obj
    return None


def normalise(source: str) -> str:
    """Source text without comments, docstrings (any statement that is only a string), blank lines, trailing
    whitespace and the indentation shared by the whole block."""
    lines = source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(iter(lines).__next__))
    statement_start = True
    for i, tok in enumerate(tokens):
        bare_string = (tok.type == tokenize.STRING and statement_start
                       and tokens[i + 1].type in (tokenize.NEWLINE, tokenize.COMMENT))
        if tok.type == tokenize.COMMENT or bare_string:
            (r0, c0), (r1, _) = tok.start, tok.end
            lines[r0 - 1] = lines[r0 - 1][:c0] + "\n"
            for r in range(r0, r1):
                lines[r] = "\n"
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            statement_start = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    return textwrap.dedent("".join(line.rstrip() + "\n" for line in lines if line.strip()))


def guarded_text(obj, guard: str) -> str:
    if guard == "source":
        return normalise(inspect.getsource(obj))
    if guard == "signature":
        sig = inspect.signature(obj)
        return str(sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                               return_annotation=sig.empty))
    raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")


def fingerprint(piece: dict) -> str | None:
    """sha256 of the piece's guarded text on the running ComfyUI; None when it has no such piece."""
    obj = resolve(piece["name"])
    if obj is None:
        return None
    return hashlib.sha256(guarded_text(obj, piece["guard"]).encode("utf-8")).hexdigest()


def where(name: str) -> str:
    """file:line of the piece in the running ComfyUI, for the reader of a failure."""
    obj = resolve(name)
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return "(no source)"


def comfyui_version() -> str:
    import comfyui_version as v
    return v.__version__


def known_entry(piece: dict, sha: str | None) -> dict | None:
    return next((k for k in piece["known"] if k["sha256"] == sha), None)


def record(names: list[str]) -> int:
    """Add the running ComfyUI's fingerprints of the named pieces (all without names) to the record."""
    data = load_record()
    unknown = set(names) - {p["name"] for p in data["pieces"]}
    if unknown:
        sys.exit(f"not in {RECORD.name}: {', '.join(sorted(unknown))} (add a new piece there by hand first)")
    version = comfyui_version()
    for piece in data["pieces"]:
        if names and piece["name"] not in names:
            continue
        sha = fingerprint(piece)
        entry = known_entry(piece, sha)
        if entry is None:
            piece["known"].append({"sha256": sha, "comfyui": [version]})
            print(f"added   {piece['name']}: {sha} (ComfyUI {version})")
        elif version not in entry["comfyui"]:
            entry["comfyui"].append(version)
            print(f"version {piece['name']}: ComfyUI {version} has the known {sha}")
    RECORD.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--record":
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_harness import get_host
    from scratch import scratch_dir

    get_host(scratch_dir("linfusion-drift-"))   # ComfyUI booted as the tests boot it (no models needed)
    return record(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

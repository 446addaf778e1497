"""The engine's folder list is its architecture: each room of linfusion_core/ imports only rooms on a lower
floor (and the shared top-level helpers), never nodes/, so a newcomer can read the layers off the folders."""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "linfusion_core"
FLOORS = {"controlnet": 3, "highres": 3, "patching": 2, "tiling": 2, "attention": 1, "weights": 1}
SHARED = {"progress", "dynamic_vram"}   # top-level modules every room may use; they import no room


def imports(path: Path):
    """(room or shared module, line) for each relative import in one engine file, resolved from its package."""
    package = path.relative_to(CORE).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert (node.module or "").split(".")[0] != "nodes", f"{path}:{node.lineno} imports nodes/"
                continue
            base = list(package[:len(package) - (node.level - 1)]) if node.level > 1 else list(package)
            assert node.level - 1 <= len(package), f"{path}:{node.lineno} imports above linfusion_core"
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if node.module else [target + [a.name] for a in node.names]
            for t in names:
                yield (t[0] if t else "", node.lineno)


def test_every_engine_file_sits_in_a_known_room():
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE).parts
        assert len(parts) <= 2, f"{path}: rooms hold files, not folders"
        if len(parts) == 2:
            assert parts[0] in FLOORS, f"{path}: {parts[0]}/ is not a room in FLOORS"
        else:
            assert path.stem in SHARED | {"__init__"}, f"{path}: a new top-level engine file belongs in a room"


def test_imports_point_down_a_floor():
    checked = 0
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE).parts
        here = parts[0] if len(parts) == 2 else None
        for target, line in imports(path):
            checked += 1
            where = f"{path.relative_to(CORE.parent)}:{line}"
            if target in SHARED:
                assert here is not None or path.stem == "__init__", f"{where}: shared helpers import no engine module"
                continue
            assert target in FLOORS, f"{where}: imports {target!r}, which is no room of linfusion_core"
            if here is None:
                raise AssertionError(f"{where}: a shared helper imports the {target}/ room")
            if target != here:
                assert FLOORS[target] < FLOORS[here], \
                    f"{where}: {here}/ (floor {FLOORS[here]}) imports {target}/ (floor {FLOORS[target]}): not downward"
    assert checked > 30   # the walk saw the engine's imports

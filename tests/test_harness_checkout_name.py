"""The harness boots ComfyUI's main.py even from a checkout named `main` (CI clones the project so): pytest then
imports that checkout's `__init__.py` as a package called `main`, which a plain `import main` would return."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent

PROBE = '''
import sys
sys.path.insert(0, {harness_dir!r})
sys.path.insert(0, {comfy!r})   # as the harness puts it
from pathlib import Path
from comfy_harness import import_comfy_main

def test_comfy_main_wins():
    assert sys.modules["main"].__file__.endswith("__init__.py")     # pytest took the name, as in CI
    saved, sys.argv = sys.argv, ["main.py", "--cpu", "--disable-auto-launch"]
    try:
        module = import_comfy_main(Path({comfy!r}))
    finally:
        sys.argv = saved
    assert Path(module.__file__).resolve() == (Path({comfy!r}) / "main.py").resolve()
    assert callable(module.start_comfyui)
'''


def test_comfy_main_found_from_a_checkout_named_main(tmp_path):
    comfy = os.environ["COMFYUI_PATH"]
    checkout = tmp_path / "main"
    checkout.mkdir()
    (checkout / "__init__.py").write_text("")
    (checkout / "test_probe.py").write_text(PROBE.format(harness_dir=str(HARNESS_DIR), comfy=comfy))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=checkout, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

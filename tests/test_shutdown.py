"""Nothing the extension leaves behind raises at interpreter exit.

ComfyUI's ModelPatcher.__del__ ejects injections when the interpreter shuts down, after imports stop
working ("sys.meta_path is None", "import of comfy halted"); anything raised there is printed as
"Exception ignored in ...". A child process boots the host, samples with LinFusion and with LinFusion +
Low-Memory Mode (so injections, wrappers and object patches are all live), keeps the models in globals of
__main__ (torn down last, when imports already fail) and exits without cleaning up."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from comfy_harness import get_host
    host = get_host(Path({model_root!r}))
    core = host.import_core()
    from linfusion_models import build_patcher, linfusion_for, sample
    base = build_patcher("sd15")
    patched, _ = core.patching.patch.apply_linfusion(base, linfusion_for(core, base.model))
    low = core.patching.low_memory.LowMemoryOptions(ff_chunks=4).apply(patched)
    sample(low, steps=1, hw=(4, 4))
    sample(patched, steps=1, hw=(4, 4))
    assert patched.is_injected
    print("LINFUSION-CHILD-RAN", flush=True)
    # No cleanup: the patchers die with the interpreter, as when a user stops ComfyUI.
""")


def test_exit_after_linfusion_prints_no_ignored_exception():
    from conftest import MODEL_ROOT

    code = CHILD.format(tests=str(TESTS), model_root=str(MODEL_ROOT))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ))
    assert child.returncode == 0, child.stderr[-4000:]
    assert "LINFUSION-CHILD-RAN" in child.stdout, child.stderr[-4000:]
    assert "Exception ignored" not in child.stderr, child.stderr[child.stderr.index("Exception ignored"):][:4000]

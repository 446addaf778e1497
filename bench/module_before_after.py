"""An older LinFusionAttention against this checkout's, in one process: interleaved A B, B A, ... after two
warm-up calls each at every size (CUDA events on a GPU), fp16 and bf16, SD 1.5 and SDXL layouts; the relative
difference of the two outputs is recorded with each row. Plain torch layers (no ComfyUI needed).

    mkdir -p /tmp/linfusion-old/oldlf && touch /tmp/linfusion-old/oldlf/__init__.py
    git show 0e2aa29:linfusion_core/module.py > /tmp/linfusion-old/oldlf/module.py
    git show 0e2aa29:linfusion_core/attention.py > /tmp/linfusion-old/oldlf/attention.py
    OUT=docs python3 bench/module_before_after.py     # writes docs/module_before_after.jsonl

On a machine without CUDA it times fp32 at the sizes of 512 and 1024 px images (SD 1.5 at 512 px only).
REPS (default 7) sets the timed calls per module and size; THREADS, torch's CPU threads (default: torch's).

docs/module_before_after_h200.jsonl is its run on the H200 lent on 2026-12-04 (idle, torch 2.11, n = 7 a side).
docs/module_before_after_cpu.jsonl: the fast path (issue #29) against 0dfbd7d on the 2-core CPU, REPS=9 THREADS=1.
"""
import json, os, statistics, sys, types, importlib.util
from pathlib import Path
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OLD = Path(os.environ.get("LINFUSION_OLD_MODULE_DIR", "/tmp/linfusion-old"))
sys.path.insert(0, str(OLD))
sys.path.insert(0, str(HERE.parent))
ops = types.SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm)
import oldlf.module as old_mod
import importlib
new_mod = importlib.import_module("linfusion_core.attention.module")

def fill(m):
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        fan = p.shape[-1] if p.dim() > 1 else 1
        p.data.copy_(torch.randn(p.shape, generator=g) / fan ** 0.5 if p.dim() > 1 else torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim()==1 else 0))
    return m

def timed(fn, reps):
    import time
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return [1000 * (time.perf_counter() - t0)]
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return ts

out = open(Path(os.environ.get("OUT", "/tmp")) / "module_before_after.jsonl", "w")
layouts = {"sd15": [(320, 8, None, [64, 128, 256]), (640, 8, None, [32, 64, 128]), (1280, 8, None, [16, 32, 64])],
           "sdxl": [(640, 10, 40, [64, 128, 256]), (1280, 20, 80, [32, 64, 128])]}
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPS = int(os.environ.get("REPS", 7))
if os.environ.get("THREADS"):
    torch.set_num_threads(int(os.environ["THREADS"]))
if dev.type == "cpu":     # the latent sides of each level at 512 and 1024 px (SD 1.5 at 512 px only)
    cpu_sides = {("sd15", 320): [64], ("sd15", 640): [32], ("sd15", 1280): [16],
                 ("sdxl", 640): [32, 64], ("sdxl", 1280): [16, 32]}
    layouts = {k: [(d, h, m, cpu_sides[k, d]) for d, h, m, _ in v] for k, v in layouts.items()}
with torch.inference_mode():
    for dtype in ((torch.float16, torch.bfloat16) if dev.type == 'cuda' else (torch.float32,)):
        for fam, levels in layouts.items():
            for dim, heads, mid, sides in levels:
                a = fill(old_mod.LinFusionAttention(dim, heads, mid, operations=ops)).to(dev, dtype).eval()
                b = new_mod.LinFusionAttention(dim, heads, mid, operations=ops).to(dev, dtype).eval()
                b.load_state_dict(a.state_dict())
                for side in sides:
                    x = torch.randn(2, side * side, dim, device=dev, dtype=dtype)
                    ya, yb = a(x), b(x)
                    err = (ya.float() - yb.float()).abs().max().item() / max(ya.float().abs().max().item(), 1e-9)
                    for f in (lambda: a(x), lambda: b(x)):
                        f()
                        f()
                    (torch.cuda.synchronize() if dev.type == "cuda" else None)
                    ta, tb = [], []
                    for r in range(REPS):
                        order = (a, b) if r % 2 == 0 else (b, a)
                        for m in order:
                            t = timed(lambda: m(x), 1)[0]
                            (ta if m is a else tb).append(t)
                    row = dict(dtype=str(dtype).split(".")[1], layout=fam, dim=dim, tokens=side * side, n=len(ta),
                               old_ms=statistics.median(ta), old_min=min(ta), old_max=max(ta),
                               new_ms=statistics.median(tb), new_min=min(tb), new_max=max(tb),
                               speedup=statistics.median(ta) / statistics.median(tb), rel_err=err)
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
out.close()

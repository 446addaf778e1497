"""The figures docs/ quoted before bench/run_all.py measured every section, in today's json layout, each row
marked with where it came from (page.SOURCES), so that the page renderer can show them until a full run
replaces them. Delete this file once docs/benchmarks.json holds a full run.

    python3 bench/legacy.py OLD_benchmarks.json docs/highres.md > docs/benchmarks.json

Two figures existed only as sentences of the old page (no data file): they are typed in below, once,
as "hand note" rows, exactly as the old page stated them.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HAND_NOTES = [  # the old page's opening paragraph: bench/highres_memory.py, then run_all.py --sections sdxl
    {"family": "sd15", "px": 2048, "variant": "sdpa", "median_s": 839.0},
    {"family": "sdxl", "px": 2048, "variant": "linfusion", "median_s": 434.7},
    {"family": "sdxl", "px": 2048, "variant": "sdpa", "median_s": 615.0},
]


def _row(r: dict, **keep) -> dict:
    out = {**keep, "source": "old"}
    if "median_s" in r:
        out.update(times_s=r["times_s"], median_s=r["median_s"], n=len(r["times_s"]), peak_bytes=r.get("peak_extra_bytes"))
    else:
        out.update(skipped=r["skipped"], predicted_s=r.get("predicted_s") or r.get("estimated_s"))
    return out


def low_memory_rows(highres_md: str) -> list[dict]:
    """docs/highres.md's normal vs low-memory table (a stand-in linear attention, one run per row)."""
    rows = []
    for attn, px, mode, secs, mib in re.findall(r"^\| (linear|softmax \(SDPA\)) \| (\d+) \| (normal|low-memory) \| "
                                                r"([\d.]+) \| (\d+) \|", highres_md, re.M):
        variant = ("linfusion" if attn == "linear" else "sdpa") + ("+low-memory" if mode == "low-memory" else "")
        rows.append({"family": "sd15", "px": int(px), "variant": variant, "median_s": float(secs), "n": 1,
                     "times_s": [float(secs)], "peak_bytes": int(mib) * 2**20, "source": "stand-in"})
    return rows


def convert(old: dict, highres_md: str) -> dict:
    attn1 = [_row(r, dim=r["dim"], tokens=r["tokens"], backend=r["backend"], dtype="float32", flops=r["flops"])
             for r in old["attn1"]]
    steps = [_row(r, family=r["family"], px=r["pixels"], variant=r["variant"]) for r in old["steps"]
             if r.get("skipped") != "not part of this run" and r["variant"] in ("linfusion", "sdpa", "no_attn1")]
    for note in HAND_NOTES:
        steps = [r for r in steps if not all(r.get(k) == note[k] for k in ("family", "px", "variant"))]
        steps.append({**note, "n": 1, "times_s": [note["median_s"]], "source": "hand note"})
    m = old["machine"]
    machine = {k: m[k] for k in ("cpu", "cpu_cores", "torch_threads", "ram_gib", "torch", "python", "device",
                                 "comfyui")}
    machine.update(load_start=float(m["load average (1 min) at start"]), commit=m["code measured"])
    meta = {"command": old["command"], "plan": "old", "started": old["started"], "elapsed_s": old["elapsed_s"],
            "load_end": float(m["load average (1 min) at end"]), "machine": machine,
            "gemm_peak_flops": {"float32": old["gemm"]["peak_flops"]}}
    return {"cpu": {"meta": meta, "sections": {"attn1": attn1, "unet_step": steps,
                                               "low_memory": low_memory_rows(highres_md)}}}


if __name__ == "__main__":
    print(json.dumps(convert(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]).read_text()), indent=1))

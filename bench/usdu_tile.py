"""One UltimateSDUpscale tile at 512, 1024 and 2048 px: SDPA vs LinFusion, side by side in one run.

UltimateSDUpscale samples the image tile by tile, each tile an img2img KSampler call at the tile's size; its
cost per tile is steps x one sampling step at that size. This times one sampling step (Euler, CFG 7.5, cond +
uncond batched: bench/models.sample, what KSampler runs) of the full SD 1.5 UNet (random weights,
bench/models.py) at each tile size, SDPA and LinFusion, interleaved: every repetition runs every (size,
variant) once, so a machine whose load changes during the run slows both alike. Within a repetition one
variant runs all sizes, then the other (the order alternates between repetitions); an untimed 64 px call
first makes ComfyUI load (patch) that variant, so switching models is not timed: a USDU user runs one.

    python3 scripts/comfy_host.py python bench/usdu_tile.py --sizes 512,1024 --n 3
    python3 scripts/comfy_host.py python bench/usdu_tile.py --device cuda --sizes 512,1024,2048 --n 5
    python3 scripts/comfy_host.py python bench/usdu_tile.py --table docs/usdu_tile.json   # its table again

Writes docs/usdu_tile.json (rows, machine, load) unless --out names another file, and prints a table:
seconds per tile step and per megapixel, so "a LinFusion tile of 2x the side for the cost of an SDPA tile"
can be read off directly.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

VARIANTS = ("sdpa", "linfusion")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", default="512,1024,2048", help="tile sides in px, comma-separated")
    p.add_argument("--n", type=int, default=3, help="repetitions (each runs every size and variant once)")
    p.add_argument("--quick", action="store_true", help="the small-width UNet (code path only, seconds)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "usdu_tile.json")
    p.add_argument("--table", type=Path, metavar="JSON", help="only print the table of a file this bench wrote")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    sizes = [int(v) for v in args.sizes.split(",") if v]
    from bench.run_all import boot
    from scratch import scratch_dir
    work = scratch_dir("linfusion-bench-models-")   # generated weights, hundreds of MB
    host = boot(args.device, work)
    import torch
    from bench import models, timing

    if args.threads:
        torch.set_num_threads(args.threads)
    core = host.import_core()
    device = torch.device(args.device)
    base = models.build("sd15", args.quick, torch.float16 if device.type == "cuda" else torch.float32)
    weights = models.linfusion_weights(core, base, "sd15", work / "linfusion" / "sd15")
    variants = {v: models.variant(core, base, weights, v) for v in VARIANTS}
    machine = timing.machine(device, REPO)
    others = timing.OtherWork()
    started = time.time()
    times = {(px, v): [] for px in sizes for v in VARIANTS}
    for rep in range(args.n):
        for v in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
            model = variants[v]
            models.sample(model, "sd15", 64)          # untimed: ComfyUI loads this variant now
            for px in sizes:
                t = timing.measure(lambda: models.sample(model, "sd15", px), device, 1, warmup=False)
                times[px, v].append(t["times_s"][0])
                print(f"rep {rep + 1}/{args.n} {px} px {v}: {t['times_s'][0]:.2f} s", flush=True)
    rows = [{"px": px, "variant": v, "n": len(ts), "times_s": ts, "median_s": statistics.median(ts),
             "s_per_megapixel": statistics.median(ts) / (px * px / 1e6)} for (px, v), ts in times.items()]
    doc = {"what": "one sampling step of one UltimateSDUpscale tile (SD 1.5, Euler, CFG 7.5, batch 2)",
           "order": "interleaved: each repetition runs every size of one variant, then of the other (order "
                    "alternating); an untimed 64 px call loads each variant first",
           "command": "python3 scripts/comfy_host.py python bench/usdu_tile.py " + " ".join(sys.argv[1:]),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "quick": args.quick,
           "machine": machine, "elapsed_s": round(time.time() - started, 1), "load_end": timing.load_average(),
           "other_cores": others.cores(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(doc))
    return 0


def table(doc) -> str:
    by = {(r["px"], r["variant"]): r for r in doc["rows"]}
    spread = lambda r: f"{r['median_s']:.2f} ({min(r['times_s']):.2f}-{max(r['times_s']):.2f})"
    lines = ["| tile | SDPA s/step (min-max) | LinFusion s/step (min-max) | speed-up | SDPA s/MP | LinFusion s/MP | n a side |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for px in sorted({r["px"] for r in doc["rows"]}):
        s, lf = by[px, "sdpa"], by[px, "linfusion"]
        ratio = f"{s['median_s'] / lf['median_s']:.2f}x" + ("" if min(s["n"], lf["n"]) >= 3 else " (n < 3: not significant)")
        lines.append(f"| {px} px | {spread(s)} | {spread(lf)} | {ratio} "
                     f"| {s['s_per_megapixel']:.1f} | {lf['s_per_megapixel']:.1f} | {min(s['n'], lf['n'])} |")
    m = doc["machine"]
    lines.append(f"\n{m.get('cpu')} ({m.get('cpu_cores')} cores, torch {m.get('torch_threads')} threads), "
                 f"load {m.get('load_start')} at start, {doc['load_end']} at end, other processes kept "
                 f"{doc['other_cores']} cores busy on average; {doc['elapsed_s']} s; commit {m.get('commit')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

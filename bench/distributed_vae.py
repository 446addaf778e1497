"""The distributed exact tiled VAE decode on the CPU: 2 ranks x 1 thread vs 1 process x 1 thread, and bytes per decode.

    python3 scripts/comfy_host.py python bench/distributed_vae.py              # measure, add rows to docs/benchmarks.json
    python3 scripts/comfy_host.py python bench/distributed_vae.py --no-write   # measure, print only

The model is the full-width SD VAE (ComfyUI's AutoencoderKL, ch 128, random weights, fp32). The ranks
(tests/distributed_vae_rank.py, gloo, env:// on 127.0.0.1, one thread each) time interleaved rounds: the
single-process tiled decode on rank 0 while the others wait at a barrier, then the two partitions (bitwise: the
single process's tiles; aligned: tiles cut at the strips) on all ranks; round 0 warms up untimed.

Bytes: what the ranks sent in one decode, by kind (rows: halos, and tile rows moving between layers whose grids
differ; keys: the mid-block attention's keys and values; output: the image gathered on every rank; reduce:
GroupNorm statistics; check: the call fingerprint). The estimate is counted from the model with hooks on an
untiled decode: each convolution taller than 1 moves one input row each way per strip boundary (an upsample's
at the low resolution, where its window is read), the keys (2 x C x the latent's pixels) reach every other rank,
the image ((world - 1) x 3 x H x W) likewise.

Other work on the machine: all CPU time /proc/stat counts minus this process's and its children's (the ranks), as
cores on average; and the 1-minute load average at the start and the end.

The rows go to the `distributed` section of the `cpu` entry of docs/benchmarks.json beside the tiled UNet's, marked
`"stage": "vae_decode"` (a rerun replaces only these), with a run record as bench/run_all.py keeps them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def halo_estimate(vae, h: int, w: int, boundaries: int, bytes_per_value: int = 4) -> dict:
    """Bytes per decode by kind, from one untiled decode of an h x w latent with hooks (see the docstring)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.model import AttnBlock, Upsample
    dec = vae.first_stage_model.decoder
    ups = {id(m.conv) for m in dec.modules() if isinstance(m, Upsample)}
    est = {"rows": 0, "keys": 0, "output": 0}

    def conv_hook(m, args, out):
        if m.kernel_size[0] > 1:
            c, width = args[0].shape[1], args[0].shape[3]
            width = width // 2 if id(m) in ups else width
            est["rows"] += 2 * c * width * bytes_per_value * boundaries
    hooks = [m.register_forward_hook(conv_hook) for m in dec.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, a, o: est.__setitem__(
        "keys", est["keys"] + boundaries * 2 * a[0].shape[1] * a[0].shape[2] * a[0].shape[3] * bytes_per_value))
        for m in dec.modules() if isinstance(m, AttnBlock)]
    with torch.no_grad():
        out = vae.first_stage_model.decode(torch.zeros(1, 4, h, w))
    for hk in hooks:
        hk.remove()
    est["output"] = boundaries * out.shape[1] * out.shape[2] * out.shape[3] * bytes_per_value
    return est


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--h", type=int, default=32, help="latent rows (x8 px)")
    p.add_argument("--w", type=int, default=48, help="latent columns (x8 px)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    args = p.parse_args(argv)

    import torch
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    saved, sys.argv = sys.argv, ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.argv = saved
    torch.set_num_threads(1)
    import random_vae
    from bench import timing
    from distributed_vae_rank import launch

    cores, started, load_start = timing.OtherWork(), time.time(), timing.load_average()
    plan = {"timeout_s": 600, "steps": [dict(kind="bench", name="bench", config="sd", h=args.h, w=args.w,
                                             tile=args.tile, n=args.n, modes=["local", "bitwise", "aligned"])]}
    out = Path(tempfile.mkdtemp(prefix="linfusion-dist-vae-bench-"))
    results = launch(args.world, plan, out, timeout_s=3600)
    bad = [r for r in results if r["rc"]]
    if bad:
        print("\n".join(f"rank {r['rank']} rc {r['rc']}:\n{r['log']}" for r in bad))
        return 1
    other_cores, load_end = cores.cores(), timing.load_average()
    ranks = [torch.load(out / f"bench.rank{k}.pt", weights_only=False) for k in range(args.world)]
    vae = random_vae.load_vae(random_vae.random_vae_state_dict(random_vae.SD_DDCONFIG, seed=1), random_vae.SD_DDCONFIG,
                              dtype=torch.float32)
    est = halo_estimate(vae, args.h, args.w, args.world - 1)
    r0 = ranks[0]
    local, ref = r0["times"]["local"], r0["outs"]["local"]
    rows = []
    for mode in ("bitwise", "aligned"):
        got = r0["outs"][mode]
        per_rank = [r["sent"][mode] for r in ranks]
        total = {k: sum(s.get(k, 0) for s in per_rank) for k in sorted({k for s in per_rank for k in s})}
        median = statistics.median(r0["times"][mode])
        rows.append({
            "stage": "vae_decode", "family": "sd_vae", "layout": "SD VAE decoder (ch 128, 4 levels), random weights",
            "device": "cpu", "dtype": "float32", "variant": mode, "world_size": args.world,
            "threads_per_rank": r0["threads"], "latent": [args.h, args.w], "px": [8 * args.h, 8 * args.w],
            "batch": 1, "tile": args.tile, "n": args.n,
            "times_s": r0["times"][mode], "median_s": median, "local_times_s": local,
            "local_median_s": statistics.median(local), "speed_ratio": statistics.median(local) / median,
            "max_rel_err": ((got - ref).abs().max() / ref.abs().max()).item(), "bitwise": bool(torch.equal(got, ref)),
            "bytes_per_call": total, "bytes_per_call_by_rank": per_rank,
            "estimate_bytes": est,
            "waits_by_rank": [r["waits"][mode][-1] for r in ranks],
            "cpu_s_by_rank": [statistics.median(r["cpu"][mode]) for r in ranks],
            "cpu_main_thread_s_by_rank": [statistics.median(r["cpu"][mode + " main thread"]) for r in ranks],
            "local_cpu_s": statistics.median(r0["cpu"]["local"]),
            "load_start": load_start, "load_end": load_end, "other_cores": other_cores})
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "layout"}, default=str))
    if args.no_write:
        return 0
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    slot = doc.setdefault("cpu", {"meta": {}, "sections": {}})
    runs = slot["meta"].setdefault("runs", [])
    runs.append({"command": "python3 scripts/comfy_host.py python bench/distributed_vae.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "plan": "distributed_vae", "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                 "elapsed_s": time.time() - started, "load_end": load_end, "other_cores": other_cores,
                 "machine": dict(timing.machine(torch.device("cpu"), REPO), load_start=load_start, torch_threads=1,
                                 ranks=args.world),
                 "sections": ["distributed"]})
    for r in rows:
        r["run"] = len(runs) - 1
    kept = [r for r in slot["sections"].get("distributed", []) if r.get("stage") != "vae_decode"]
    slot["sections"]["distributed"] = kept + rows
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"written: {args.out} (cpu.sections.distributed, stage vae_decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

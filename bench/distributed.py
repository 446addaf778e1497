"""The distributed tiled UNet on the CPU: 2 ranks x 1 thread vs 1 process x 1 thread, and bytes per call.

    python3 scripts/comfy_host.py python bench/distributed.py              # measure, write docs/benchmarks.json
    python3 scripts/comfy_host.py python bench/distributed.py --no-write   # measure, print only
    bench/distributed_gpu.sh                                                # NCCL, one GPU per rank (unrun)

The model is SD 1.5's UNet layout (4 levels, 2 res blocks each, channel_mult 1-2-4-4, LinFusion in all 16
transformer blocks, so its 61 GroupNorms and 16 state reductions are SD 1.5's) at a fifth of its width
(model_channels 64), random weights, fp32, batch 2 (cond + uncond). The ranks (tests/distributed_rank.py,
gloo, env:// on 127.0.0.1) time interleaved rounds: the single-process tiled runner on rank 0 while the others
wait at a barrier, then the two partitions (bitwise: the single process's tiles; aligned: tiles cut at the
strips) on all ranks; round 0 warms up untimed.

Bytes: what each rank sent in one call, by kind (rows: halos and tile rows moving between grids; gather: layers
run whole; reduce: GroupNorm statistics and LinFusion states; check: the call fingerprint). The halo estimate is
counted from the model: every convolution with a kernel taller than 1 moves one row of its input each way
per strip boundary (at the low resolution for an upsampling convolution). Scaled to SD 1.5 (x5 channels, the
latent width) it is an estimate, labelled so.

Rows go to the `distributed` section of the `cpu` entry of docs/benchmarks.json, with a run record as
bench/run_all.py keeps them; other sections are left as they are (bench/page.py does not render this one yet).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SD15_LAYOUT = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                   adm_in_channels=None, in_channels=4, model_channels=64, num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                   use_linear_in_transformer=False, context_dim=768, num_heads=8,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                   use_temporal_resblock=False)
SD15_WIDTH = 320   # ComfyUI's SD15 unet_config (comfy/model_detection.py) but model_channels


def halo_estimate(h: int, w: int, batch: int, boundaries: int, bytes_per_value: int = 4, width: int = 64) -> dict:
    """Bytes of halo rows per call (one row each way per boundary per tall-kernel convolution), and the counts
    of GroupNorms and LinFusion layers, from one untiled forward of the bench model with hooks."""
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, Upsample
    unet = UNetModel(**dict(SD15_LAYOUT, model_channels=width), dtype=torch.float32, device="cpu")
    halo, counts = [0], {"group_norm": 0, "transformer": 0}
    ups = {id(m.conv) for m in unet.modules() if isinstance(m, Upsample) and m.use_conv}

    def conv_hook(m, args, _):
        if m.kernel_size[0] > 1:
            c, width = args[0].shape[1], args[0].shape[3]
            width = width // 2 if id(m) in ups else width
            halo[0] += 2 * c * width * batch * bytes_per_value * boundaries

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda *a: counts.__setitem__("group_norm", counts["group_norm"] + 1))
        elif type(m).__name__ == "BasicTransformerBlock":
            m.register_forward_hook(lambda *a: counts.__setitem__("transformer", counts["transformer"] + 1))
    with torch.no_grad():
        unet(torch.zeros(batch, 4, h, w), torch.tensor([500.0] * batch),
             torch.zeros(batch, 77, 768), transformer_options={})
    return {"halo_bytes": halo[0], **counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--size", type=int, default=96, help="latent side (x8 px)")
    p.add_argument("--tile", type=int, default=48)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--width", type=int, default=64, help="model_channels (SD 1.5: 320)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU per rank")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--park", choices=["cpu", "accelerator"], default="cpu")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    args = p.parse_args(argv)

    import os
    import torch
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    saved, sys.argv = sys.argv, ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.argv = saved
    torch.set_num_threads(1)
    from bench import timing
    from distributed_rank import launch

    batch, size = 2, args.size
    others, started = timing.OtherWork(), time.time()
    load_start = timing.load_average()
    layout = dict(SD15_LAYOUT, model_channels=args.width)
    plan = {"timeout_s": 600, "backend": "nccl" if args.device == "cuda" else "gloo",
            "steps": [dict(kind="bench", name="bench", config=layout, b=batch, h=size, w=size, tile=args.tile, n=args.n,
                           modes=["local", "bitwise", "aligned"], device=args.device, dtype=args.dtype, park=args.park)]}
    out = Path(tempfile.mkdtemp(prefix="linfusion-dist-bench-"))
    results = launch(args.world, plan, out, timeout_s=3600)
    bad = [r for r in results if r["rc"]]
    if bad:
        print("\n".join(f"rank {r['rank']} rc {r['rc']}:\n{r['log']}" for r in bad))
        return 1
    ranks = [torch.load(out / f"bench.rank{k}.pt", weights_only=False) for k in range(args.world)]
    load_end, other_cores = timing.load_average(), others.cores()
    est_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    # counted on a 64 x 64 latent at width 64 (cheap on any CPU), scaled by channels and latent width: exact for
    # sizes that halve evenly down to the deepest level (a multiple of 8)
    est = halo_estimate(64, 64, batch, args.world - 1, est_bytes, 64)
    est["halo_bytes"] = est["halo_bytes"] * args.width * size // (64 * 64)
    r0 = ranks[0]
    local = r0["times"]["local"]
    ref = r0["outs"]["local"]
    rows = []
    for mode in ("bitwise", "aligned"):
        got = r0["outs"][mode]
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        per_rank = [r["sent"][mode] for r in ranks]
        total = {k: sum(s.get(k, 0) for s in per_rank) for k in sorted({k for s in per_rank for k in s})}
        median = statistics.median(r0["times"][mode])
        rows.append({
            "family": "sd15", "layout": f"SD 1.5 layout, model_channels {args.width}, LinFusion in all 16 blocks",
            "device": args.device, "dtype": args.dtype,
            "variant": mode, "world_size": args.world, "threads_per_rank": r0["threads"], "latent": [size, size],
            "px": size * 8, "batch": batch, "tile": args.tile, "n": args.n,
            "times_s": r0["times"][mode], "median_s": median, "local_times_s": local,
            "local_median_s": statistics.median(local), "speed_ratio": statistics.median(local) / median,
            "max_rel_err": err, "bitwise": bool(torch.equal(got, ref)),
            "bytes_per_call": total, "bytes_per_call_by_rank": per_rank,
            "waits_by_rank": [r["waits"][mode][-1] for r in ranks],
            # CPU seconds of each rank's process per call (its share of the work, whatever else shares the cores)
            "cpu_s_by_rank": [statistics.median(r["cpu"][mode]) for r in ranks],
            "cpu_main_thread_s_by_rank": [statistics.median(r["cpu"][mode + " main thread"]) for r in ranks],
            "local_cpu_s": statistics.median(r0["cpu"]["local"]),
            "halo_estimate_bytes": est["halo_bytes"], "group_norms": est["group_norm"],
            "transformer_blocks": est["transformer"],
            # the halo count scaled to SD 1.5 (x channels, x latent width): an estimate; in this run's dtype and
            # batch, and on the basis (fp16, one image), which gives its 34 / 69 / 138 MB
            "sd15_halo_estimate_bytes_at": {px: est["halo_bytes"] * SD15_WIDTH * (px // 8) // (args.width * size)
                                            for px in (4096, 8192, 16384)},
            "sd15_halo_estimate_fp16_per_image_bytes_at": {
                px: est["halo_bytes"] * SD15_WIDTH * (px // 8) * 2 // (args.width * size * est_bytes * batch)
                for px in (4096, 8192, 16384)},
            "load_start": load_start, "load_end": load_end, "other_cores": other_cores})
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k not in ("layout",)}, indent=None, default=str))
    if args.no_write:
        return 0
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    slot = doc.setdefault("gpu" if args.device == "cuda" else "cpu", {"meta": {}, "sections": {}})
    runs = slot["meta"].setdefault("runs", [])
    runs.append({"command": "python3 scripts/comfy_host.py python bench/distributed.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "plan": "distributed", "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                 "elapsed_s": time.time() - started, "load_end": load_end, "other_cores": other_cores,
                 "machine": dict(timing.machine(torch.device(args.device), REPO), load_start=load_start,
                                 torch_threads=1, ranks=args.world),
                 "sections": ["distributed"]})
    for r in rows:
        r["run"] = len(runs) - 1
    # the tiled VAE's rows (bench/distributed_vae.py) share the section: keep them
    kept = [r for r in slot["sections"].get("distributed", []) if r.get("stage") == "vae_decode"]
    slot["sections"]["distributed"] = rows + kept
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"written: {args.out} ({'gpu' if args.device == 'cuda' else 'cpu'}.sections.distributed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

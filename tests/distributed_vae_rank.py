"""One rank of the distributed tiled VAE tests (test_tiled_vae_distributed.py) and bench/distributed_vae.py.

Started as torchrun starts a rank (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE; env:// on 127.0.0.1), one thread,
ComfyUI imported with --cpu as tests/distributed_rank.py does (its `boot`). The VAEs are ComfyUI's own
AutoencoderKL with random variance-preserving weights (tests/random_vae.py), the same on every rank (seeded).

    python tests/distributed_vae_rank.py PLAN.json OUT_DIR

Steps, run in order on every rank (SPMD):
- {"kind": "decode" | "encode", "name", "config", "h", "w", "tile", "b"?, "weights"?, "aligned"?, "image"?}: the
  distributed decode (encode) of a seeded latent (pixels, h x w); rank 0 also runs the single-process tiled one
  and ComfyUI's untiled first_stage_model.decode (encode), and with "image" VAE.decode's IMAGE beside ours.
- {"kind": "mismatch", "name"}: rank 1 decodes another latent; every rank must raise DistributedMismatch.
- {"kind": "cancel", "name", "config", "h", "w", "tile", "cancel_at"}: three decodes in a distributed session (a
  distributed_session.Session on the process group's store, prompt ids set as ComfyUI's executor sets them):
  "inside": rank 0's interrupt flag is set at its tile `cancel_at` (ComfyUI's per-op check then raises inside its
  next convolution); "before": rank 0 is interrupted before its next call of the prompt; "next": a decode in the
  next prompt. Each rank records what it raised, where the session says it stopped, and what it decoded.
- {"kind": "fault", "name", "rank"}: that rank raises inside a decoder convolution; the others record what they
  raised and when.
- {"kind": "bench", "name", "config", "h", "w", "tile", "n", "modes"}: n interleaved rounds ("local": the
  single-process tiled decode on rank 0 while the others wait at a barrier; "bitwise", "aligned": partitions).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def launch(world: int, plan: dict, out_dir: Path, timeout_s: float = 240, threads: int = 1) -> list[dict]:
    """Run the plan on `world` ranks of this script (distributed_rank.launch, with this file as the rank)."""
    from distributed_rank import launch as launch_ranks
    return launch_ranks(world, plan, out_dir, timeout_s, threads, script=__file__)


def main(plan_path, out_dir):
    from distributed_rank import boot
    core = boot()
    import linfusion_core.tiling.distributed_session  # noqa: F401
    import linfusion_core.tiling.tiled_vae_distributed  # noqa: F401
    import torch
    import torch.distributed as dist
    import random_vae
    tv, tvd = core.tiling.tiled_vae, core.tiling.tiled_vae_distributed
    dist_mod = core.tiling.tiled_unet_distributed
    plan = json.loads(Path(plan_path).read_text())
    rank, world = dist_mod.init_from_env("gloo", timeout_s=plan.get("timeout_s", 60))
    out = Path(out_dir)
    vaes = {}

    def vae_for(config):
        if config not in vaes:
            ddconfig = {"small": random_vae.SMALL_DDCONFIG, "tiny": random_vae.TINY_DDCONFIG,
                        "sd": random_vae.SD_DDCONFIG}[config]
            vaes[config] = random_vae.load_vae(random_vae.random_vae_state_dict(ddconfig, seed=1), ddconfig,
                                               dtype=torch.float32)
        return vaes[config]

    def save(name, **values):
        torch.save(values, out / f"{name}.rank{rank}.pt")

    def latent(step, seed=2):
        return torch.randn(step.get("b", 1), 4, step["h"], step["w"], generator=torch.Generator().manual_seed(seed))

    for step in plan["steps"]:
        kind, name = step["kind"], step["name"]
        part = tvd.VAEStrips(weights=step.get("weights"), aligned=step.get("aligned", False))
        if kind in ("decode", "encode"):
            vae, tile = vae_for(step["config"]), step["tile"]
            ticks = []
            progress = lambda done, total: ticks.append((done, total))  # noqa: E731
            if kind == "decode":
                x = latent(step)
                got = tvd.decode_raw(vae, x, tile, partition=part, on_progress=progress)
            else:
                x = torch.rand(step.get("b", 1), 3, step["h"], step["w"], generator=torch.Generator().manual_seed(3))
                x = x * 2 - 1
                got = tvd.encode_raw(vae, x, tile, partition=part, on_progress=progress)
            values = dict(out=got, sent=dict(part.sent), ticks=ticks)
            if step.get("image"):
                values["image"] = tvd.decode(vae, x, tile, partition=part)
            if rank == 0:
                local_ticks = []
                with torch.no_grad():
                    if kind == "decode":
                        values.update(tiled=tv.decode_raw(vae, x, tile, on_progress=lambda d, t: local_ticks.append(t)),
                                      untiled=vae.first_stage_model.decode(x).float())
                        if step.get("image"):
                            values["comfy_image"] = vae.decode(x)
                    else:
                        values.update(tiled=tv.encode_raw(vae, x, tile, on_progress=lambda d, t: local_ticks.append(t)),
                                      untiled=vae.first_stage_model.encode(x).float())
                values["local_total"] = local_ticks[-1]
            save(name, **values)
        elif kind == "mismatch":
            vae = vae_for("tiny")
            x = latent(dict(h=6, w=5), seed=1 + (rank == 1))
            try:
                tvd.decode_raw(vae, x, 32, partition=part)
                save(name, raised=None)
            except Exception as e:
                save(name, raised=type(e).__name__, message=str(e))
        elif kind == "cancel":
            import comfy.model_management as mm
            from comfy_execution.utils import CurrentNodeContext
            ds = core.tiling.distributed_session
            vae, tile, x = vae_for(step["config"]), step["tile"], latent(step)
            ds._session = session = ds.Session(rank, world, dist.distributed_c10d._get_default_store(), None,
                                               plan.get("timeout_s", 60))
            session.seq_of.update({"p1": 1, "p2": 2})     # as rank 0's queue numbers the prompts
            rec = {}

            def attempt(label, cancel_at=None):
                part, fired = tvd.VAEStrips(), []

                def progress(done, total):
                    if rank == 0 and done == cancel_at and not fired:
                        fired.append(part.reductions)
                        mm.interrupt_current_processing(True)   # the UI's cancel, between two of rank 0's tiles:
                        return                                  # the next convolution's per-op check raises
                    mm.throw_exception_if_processing_interrupted()   # as the node's progress bar checks
                try:
                    got = tvd.decode_raw(vae, x, tile, partition=part, on_progress=progress)
                    rec[label] = dict(raised=None, out=got)
                except mm.InterruptProcessingException:
                    rec[label] = dict(raised="InterruptProcessingException")
                rec[label].update(at=session.cancelled_at, reductions=part.reductions, fired=fired,
                                  flag_after=mm.processing_interrupted())
            with CurrentNodeContext("p1", "10"):
                attempt("inside", step["cancel_at"])
                if rank == 0:
                    mm.interrupt_current_processing(True)
                attempt("before")
            with CurrentNodeContext("p2", "10"):
                attempt("next")
            ds._session = None
            if rank == 0:
                with torch.no_grad():
                    rec["tiled"] = tv.decode_raw(vae, x, tile)
            save(name, **rec)
        elif kind == "fault":
            bad, vae = step["rank"], vae_for(step["config"])
            conv = vae.first_stage_model.decoder.up[1].block[0].conv1    # the full-resolution end of the decode
            original = conv.forward
            if rank == bad:
                def boom(*args, **kwargs):
                    save(name, failed_at=time.time())
                    raise RuntimeError("injected fault")
                conv.forward = boom
            try:
                tvd.decode_raw(vae, latent(step), step["tile"], partition=part)
                raised = dict(raised=None)
            except Exception as e:
                raised = dict(raised=type(e).__name__, message=str(e)[:500], raised_at=time.time())
            conv.forward = original
            if rank != bad:
                save(name, **raised)
            else:
                save(name, failed_at=torch.load(out / f"{name}.rank{rank}.pt")["failed_at"], **raised)
                # Stay alive (as a ComfyUI that caught the error would) until the others have raised: they must
                # learn of the fault from the store, not from a closed socket.
                others = [out / f"{name}.rank{k}.pt" for k in range(world) if k != rank]
                deadline = time.monotonic() + plan.get("timeout_s", 60)
                while time.monotonic() < deadline and not all(o.exists() for o in others):
                    time.sleep(0.05)
            sys.stdout.flush()
            os._exit(0)     # the session is over: no collective after a fault
        elif kind == "bench":
            vae, tile = vae_for(step["config"]), step["tile"]
            x = latent(step)
            parts = {m: tvd.VAEStrips(aligned=(m == "aligned")) for m in step["modes"] if m != "local"}
            times, cpu, sent, waits, outs = {m: [] for m in step["modes"]}, {}, {}, {}, {}
            for i in range(step["n"] + 1):   # round 0 warms up, untimed
                for m in step["modes"]:
                    dist.barrier()
                    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
                    if m != "local":
                        outs[m] = tvd.decode_raw(vae, x, tile, partition=parts[m])
                    elif rank == 0:
                        outs[m] = tv.decode_raw(vae, x, tile)
                    c1, m1 = time.process_time(), time.thread_time()
                    dist.barrier()
                    if i:
                        times[m].append(time.perf_counter() - t0)
                        cpu.setdefault(m, []).append(c1 - c0)
                        cpu.setdefault(m + " main thread", []).append(m1 - m0)
                    if m in parts:
                        sent[m] = dict(parts[m].sent)
                        waits.setdefault(m, []).append(dict(parts[m].waits))
            save(name, times=times, cpu=cpu, sent=sent, waits=waits, outs=outs if rank == 0 else None,
                 threads=torch.get_num_threads())
        else:
            raise ValueError(f"unknown step {kind}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

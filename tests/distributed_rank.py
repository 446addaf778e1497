"""One rank of the distributed tiled UNet tests (test_tiled_unet_distributed.py) and bench/distributed.py.

Started as torchrun starts a rank: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment (env://
rendezvous on 127.0.0.1), COMFYUI_PATH naming the ComfyUI to import (scripts/comfy_host.py sets it). ComfyUI's
modules are imported with --cpu as its main.py would parse them; the extension's linfusion_core is imported
from this checkout as a package. One thread per rank.

    python tests/distributed_rank.py PLAN.json OUT_DIR

The plan lists steps, run in order on every rank (the same list everywhere, as SPMD requires):
- {"kind": "forward", "name", "family", "b", "h", "w", "tile", "weights"?}: one UNet call of a small UNet
  (tiled_unet_models.py), split over the ranks; rank 0 also runs the single-process tiled runner and the
  untiled UNet on the same inputs. Writes <name>.rank<k>.pt: the output (every rank), the references (rank 0),
  bytes sent by kind, the layers that ran untiled, seconds.
- {"kind": "sample", "name", "family", "h", "w", "tile", "steps"}: ComfyUI's sampler (comfy.sample, euler, CFG)
  through the Tiled UNet's wrapper with the partition; rank 0 also samples with the single-process wrapper and
  the plain model.
- {"kind": "mismatch", "name"}: rank 1 calls with another latent; every rank must raise DistributedMismatch.
- {"kind": "fault", "name", "rank", "how": "raise" | "exit"}: that rank raises inside a layer (or exits the
  process); the others write what they raised and after how many seconds.
- {"kind": "bench", "name", "config", "b", "h", "w", "tile", "n", "modes"}: n interleaved rounds timing each mode
  ("local": the single-process runner on rank 0; "bitwise", "aligned": the partitions) (bench/distributed.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch(world: int, plan: dict, out_dir: Path, timeout_s: float = 240, threads: int = 1,
           script: Path | str = __file__) -> list[dict]:
    """Run the plan on `world` ranks of `script` (this file, or another rank script taking the same
    arguments: subprocesses, env:// on a free port of 127.0.0.1); each rank's exit code and output. The ranks are
    killed (by their ids) if they outlast timeout_s."""
    import socket
    import subprocess
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(script), str(plan_path), str(out_dir)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline, results = time.monotonic() + timeout_s, []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        log.close()
        results.append({"rank": rank, "rc": rc, "log": (out_dir / f"rank{rank}.log").read_text()[-4000:]})
    return results


def boot():
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO), str(REPO / "tests")]
    saved, sys.argv = sys.argv, ["main.py", "--cpu", "--disable-auto-launch"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parsed now, with --cpu)
    sys.argv = saved
    import torch
    torch.set_num_threads(1)
    import linfusion_core.patching.block_map  # noqa: F401  (the attributes tests' helpers use on `core`)
    import linfusion_core.weights.checkpoint  # noqa: F401
    import linfusion_core.attention.module  # noqa: F401
    import linfusion_core.patching.patch  # noqa: F401
    import linfusion_core.tiling.tiled_unet  # noqa: F401
    import linfusion_core.tiling.tiled_unet_distributed  # noqa: F401
    import linfusion_core.tiling.tiled_unet_patch  # noqa: F401
    return linfusion_core


def main(plan_path, out_dir):
    core = boot()
    import torch
    import tiled_unet_models as tm
    dist_mod = core.tiling.tiled_unet_distributed
    plan = json.loads(Path(plan_path).read_text())
    rank, world = dist_mod.init_from_env(plan.get("backend", "gloo"), timeout_s=plan.get("timeout_s", 60))
    out = Path(out_dir)
    unets = {}

    def unet_for(family):
        if family not in unets:
            lin = core.attention.module.LinFusionAttention
            cast = {"operations": __import__("comfy.ops").ops.manual_cast} if family.endswith("_cast") else {}
            unets[family] = tm.build_unet(tm.CONFIGS[family], lin, 0 if family != "sdxl" else 1,
                                          skip_middle=family.startswith("sd15"), **cast)
        return unets[family]

    def save(name, **values):
        torch.save(values, out / f"{name}.rank{rank}.pt")

    for step in plan["steps"]:
        kind, name = step["kind"], step["name"]
        part = dist_mod.Strips(weights=step.get("weights"), aligned=step.get("aligned", False))
        if kind in ("forward", "fault"):
            family = step.get("family", "sd15")
            unet, config = unet_for(family), tm.CONFIGS[family]
            x, t, ctx, y = tm.inputs(config, step.get("b", 2), step.get("h", 20), step.get("w", 20))
        if kind == "forward":
            runner = core.tiling.tiled_unet.TiledUNetRunner(unet, step["tile"], "cpu", "cpu", progress=False, partition=part)
            with torch.no_grad():
                t0 = time.perf_counter()
                got = runner.forward(x, t, ctx, y, transformer_options={})
                seconds = time.perf_counter() - t0
                values = dict(out=got, sent=dict(part.sent), seconds=seconds, untiled=runner.untiled_layers,
                              ticks=runner.ticks)
                if rank == 0:
                    local = core.tiling.tiled_unet.TiledUNetRunner(unet, step["tile"], "cpu", "cpu", progress=False)
                    values.update(tiled=local.forward(x, t, ctx, y, transformer_options={}),
                                  untiled_ref=unet(x, t, ctx, y, transformer_options={}), local_ticks=local.ticks)
            save(name, **values)
        elif kind == "bench":
            # Interleaved: each round times every mode once, the others waiting at a barrier (a blocked socket
            # read: no CPU). "local" runs on rank 0 alone (the single-process runner), the others on all ranks.
            config = dict(step["config"])
            device = torch.device("cuda", torch.cuda.current_device()) if step.get("device") == "cuda" else torch.device("cpu")
            dtype = getattr(torch, step.get("dtype", "float32"))
            unet = tm.build_unet(config, core.attention.module.LinFusionAttention, 0).to(device, dtype)
            x, t, ctx, y = (v.to(device, dtype) if v is not None and v.is_floating_point() else v
                            for v in tm.inputs(config, step["b"], step["h"], step["w"]))
            t = t.to(device)
            park = step.get("park", "cpu")
            parts = {m: dist_mod.Strips(aligned=(m == "aligned")) for m in step["modes"] if m != "local"}
            times, sent, outs, waits, cpu = {m: [] for m in step["modes"]}, {}, {}, {}, {}
            import torch.distributed as dist
            with torch.no_grad():
                for i in range(step["n"] + 1):   # round 0 warms up, untimed
                    for m in step["modes"]:
                        dist.barrier()
                        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
                        if m != "local" or rank == 0:
                            runner = core.tiling.tiled_unet.TiledUNetRunner(unet, step["tile"], device if park != "cpu" else "cpu",
                                                                     device, progress=False, partition=parts.get(m))
                            outs[m] = runner.forward(x, t, ctx, y, transformer_options={}).float().cpu()
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                        c1, m1 = time.process_time(), time.thread_time()
                        dist.barrier()
                        if i:
                            times[m].append(time.perf_counter() - t0)
                            cpu.setdefault(m, []).append(c1 - c0)
                            cpu.setdefault(m + " main thread", []).append(m1 - m0)
                        if m in parts:
                            sent[m] = dict(parts[m].sent)
                            waits.setdefault(m, []).append(dict(parts[m].waits))
            save(name, times=times, cpu=cpu, sent=sent, waits=waits, outs=outs if rank == 0 else None, threads=torch.get_num_threads())
        elif kind == "sample":
            family = step.get("family", "sd15")
            base = tm.model_patcher(core, family, 5)
            model = core.tiling.tiled_unet_patch.apply_tiled_unet(base, step["tile"], progress=False, partition=part)
            got = tm.sample(model, family, step["h"], step["w"], step["steps"])
            values = dict(out=got, calls=part.calls)
            if rank == 0:
                values["tiled"] = tm.sample(core.tiling.tiled_unet_patch.apply_tiled_unet(base, step["tile"], progress=False),
                                            family, step["h"], step["w"], step["steps"])
                values["untiled_ref"] = tm.sample(base, family, step["h"], step["w"], step["steps"])
            save(name, **values)
        elif kind == "mismatch":
            unet, config = unet_for("sd15"), tm.CONFIGS["sd15"]
            x, t, ctx, y = tm.inputs(config, 1, 12, 12, seed=1 + (rank == 1))
            runner = core.tiling.tiled_unet.TiledUNetRunner(unet, 8, "cpu", "cpu", progress=False, partition=part)
            try:
                with torch.no_grad():
                    runner.forward(x, t, ctx, y, transformer_options={})
                save(name, raised=None)
            except Exception as e:
                save(name, raised=type(e).__name__, message=str(e))
        elif kind == "fault":
            bad = step["rank"]
            block = unet.output_blocks[1][0]   # a ResBlock of the up path: the call is well under way
            if rank == bad:
                def boom(*args, **kwargs):
                    save(name, failed_at=time.time())
                    if step["how"] == "exit":
                        os._exit(17)
                    raise RuntimeError("injected fault")
                block.emb_layers.forward = boom
            runner = core.tiling.tiled_unet.TiledUNetRunner(unet, step["tile"], "cpu", "cpu", progress=False, partition=part)
            try:
                with torch.no_grad():
                    runner.forward(x, t, ctx, y, transformer_options={})
                raised = dict(raised=None)
            except Exception as e:
                raised = dict(raised=type(e).__name__, message=str(e)[:500], raised_at=time.time())
            if rank != bad:
                save(name, **raised)
            else:
                save(name, failed_at=torch.load(out / f"{name}.rank{rank}.pt")["failed_at"], **raised)
                # Stay alive (as a ComfyUI that caught the error would) until the others have raised, up to
                # the process group's timeout: they must learn of the fault from the store, not a closed socket.
                others = [out / f"{name}.rank{k}.pt" for k in range(world) if k != rank]
                deadline = time.monotonic() + plan.get("timeout_s", 60)
                while time.monotonic() < deadline and not all(o.exists() for o in others):
                    time.sleep(0.05)
            # the session is over: no collective after a fault (the other ranks may be gone)
            sys.stdout.flush()
            os._exit(0)
        else:
            raise ValueError(f"unknown step {kind}")
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        if os.environ.get("LINFUSION_PROFILE"):   # a developer's look at where a rank's time goes
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(main, sys.argv[1], sys.argv[2])
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

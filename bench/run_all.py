"""Every benchmark number of README.md and docs/, in one process inside the real ComfyUI host, and the page.

    python3 scripts/comfy_host.py python bench/run_all.py                  # CPU, all sections: hours on 2 cores
    python3 scripts/comfy_host.py python bench/run_all.py --quick          # tiny sizes, < 3 min, temp folder
    python3 scripts/comfy_host.py python bench/run_all.py --device cuda    # the GPU plan (bench/gpu.sh), < 7 min
    python3 scripts/comfy_host.py python bench/run_all.py --device cpu --smoke   # the GPU plan's code path on CPU
    python3 scripts/comfy_host.py python bench/run_all.py --from-json docs/benchmarks.json   # page only
    python3 scripts/comfy_host.py python bench/run_all.py --sections attn1,sd15,sdxl --step-px 512,1024
                                              # the attn1 tables and the steps at 512 and 1024 px, n = 3 each
    python3 scripts/comfy_host.py python bench/run_all.py --sections sd15,sdxl --step-px 2048 --steps-n 1

Raw rows go to benchmarks.json (one entry per device: a CPU run keeps the GPU entry and vice versa), the
page (benchmarks.md) and plots are rendered from that file only (bench/page.py). Measurements predicted to
overrun --budget-min are skipped and say so with their predicted time, which the page calls an estimate.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from scratch import scratch_dir  # noqa: E402  (tests/)

log = logging.getLogger("LinFusion")
ints = lambda text: [int(v) for v in text.split(",") if v]

# What each plan measures: sizes in px, repeats n (the same for every variant compared), limits in seconds.
PLANS = {
    # repeat_below_px: sizes below it run steps_n times, sizes from it once (the page says n): on 2 cores one
    # SDPA step at 2048 px takes about 10 minutes. breakdown_max_s: a workflow step predicted longer is skipped.
    "cpu": dict(attn1="CPU_SIDES", dtypes=["float32"], attn1_n=3, max_call_s=30, steps_n=3, repeat_below_px=1024,
                max_step_s=2400, sd15=[512, 1024, 2048], sdxl=[512, 1024, 2048], low_memory=[512, 1024, 2048],
                tiled_unet=[512, 1024, 1536], tile=64, tiled_vae=[512, 1024, 2048], vae_tile=512,
                peers=[1024, 2048], controlnet=[1024], breakdown_max_s=400, ladder=[], budget_min=480),
    "quick": dict(attn1="QUICK_SIDES", dtypes=["float32"], attn1_n=3, max_call_s=5, steps_n=1, max_step_s=60,
                  sd15=[64, 128], sdxl=[64], low_memory=[64], tiled_unet=[64], tile=4, tiled_vae=[64], vae_tile=32,
                  peers=[64], controlnet=[64], breakdown_max_s=60, ladder=[], budget_min=2),
    "cuda": dict(attn1="GPU_SIDES", dtypes=["float16", "bfloat16"], attn1_n=5, max_call_s=5, steps_n=3,
                 max_step_s=60, sd15=[512, 1024, 2048, 4096], sdxl=[512, 1024, 2048, 4096], low_memory=[], tiled_unet=[],
                 tiled_vae=[], peers=[], controlnet=[], ladder=[], tile=256, vae_tile=1024, budget_min=1.8),
    "smoke": dict(attn1="SMOKE_SIDES", dtypes=["float16", "bfloat16"], attn1_n=1, max_call_s=20, steps_n=1,
                  max_step_s=60, sd15=[64], sdxl=[64], low_memory=[], tiled_unet=[], tiled_vae=[], peers=[],
                  controlnet=[], ladder=[128], tile=4, vae_tile=32, budget_min=2),
}
SECTIONS = "attn1,sd15,low_memory,tiled_unet,tiled_vae,breakdown,controlnet,peers,ladder,sdxl"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="the CPU plan at tiny sizes and small models (< 3 min)")
    p.add_argument("--smoke", action="store_true", help="the GPU plan at tiny sizes and small models")
    p.add_argument("--budget-min", type=float, help="time budget in minutes (default: the plan's)")
    p.add_argument("--sections", default=SECTIONS, help=f"subset of {SECTIONS}")
    p.add_argument("--out", type=Path, help="folder of benchmarks.json/.md and plots (default: docs/, or a "
                   "temporary folder with --quick/--smoke)")
    p.add_argument("--official-linfusion", metavar="PATH", help="checkout of github.com/Huage001/LinFusion")
    p.add_argument("--tiled-diffusion", metavar="PATH", help="checkout of github.com/shiimizu/ComfyUI-TiledDiffusion (default: the "
                   "snapshot in ../shared/third_party/, see bench/peers.py)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--step-px", type=ints, help="the SD1.5 and SDXL step sizes (px, comma-separated), each run the "
                   "plan's steps_n times (n = 3 on the CPU plan) instead of the plan's sizes")
    p.add_argument("--steps-n", type=int, help="timed runs per step variant and size (default: the plan's steps_n)")
    p.add_argument("--attn1-n", type=int, help="timed calls per attn1 backend and size (default: the plan's attn1_n); "
                   "a difference of a few percent needs more than 3")
    p.add_argument("--attn1-layouts", help="attn1 layouts to measure: sd15, sdxl (default: both)")
    p.add_argument("--attn1-max-px", type=int, help="attn1: only the sizes met at up to this image side")
    p.add_argument("--from-json", type=Path, help="only render the page and plots from this benchmarks.json")
    return p.parse_args(argv)


def boot(device: str, work: Path):
    """ComfyUI in this process with the extension loaded by its own loader (tests/comfy_harness.py). The
    harness boots with --cpu; for a GPU run ComfyUI's arguments are parsed first, without it."""
    if device == "cuda":
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
        saved, sys.argv = sys.argv, ["main.py", "--disable-auto-launch"]
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parsed now; the harness's own parse is then a no-op)
        sys.argv = saved
    from comfy_harness import get_host
    return get_host(work)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    from bench import page
    if args.from_json:
        print(f"written: {page.write(json.loads(args.from_json.read_text()), args.out or args.from_json.parent)}")
        return 0
    key = "smoke" if args.smoke else "quick" if args.quick else args.device
    plan = dict(PLANS[key])
    if args.budget_min:
        plan["budget_min"] = args.budget_min
    if args.steps_n:
        plan["steps_n"] = args.steps_n
    if args.attn1_n:
        plan["attn1_n"] = args.attn1_n
    if args.step_px:
        plan.update(sd15=args.step_px, sdxl=args.step_px, repeat_below_px=max(args.step_px) + 1)
    plan["attn1_layouts"] = (args.attn1_layouts or "sd15,sdxl").split(",")
    plan["attn1_max_px"] = args.attn1_max_px
    out = args.out or (Path(tempfile.mkdtemp(prefix="linfusion-bench-")) if args.quick or args.smoke else REPO / "docs")
    work = scratch_dir("linfusion-bench-models-")   # generated weights, hundreds of MB
    host = boot(args.device, work)
    import torch
    from bench import timing
    if args.threads or args.quick or args.smoke:
        # One thread for the small runs: on a shared machine, OpenMP threads spin while their partners wait.
        torch.set_num_threads(args.threads or 1)
    core = host.import_core()
    device = torch.device(args.device)
    command = "python3 scripts/comfy_host.py python bench/run_all.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    slot = "gpu" if key in ("cuda", "smoke") else "cpu"
    doc = json.loads((out / "benchmarks.json").read_text()) if (out / "benchmarks.json").exists() else {}
    this = {"command": command.strip(), "plan": key, "plan_settings": plan,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": timing.machine(device, REPO),
            "sections": []}
    this["gemm_peak_flops"] = {d: timing.gemm_peak_flops(device, getattr(torch, d), key in ("quick", "smoke"))
                               for d in plan["dtypes"]}
    # A run replaces the rows it measures and keeps the others with the run that measured them, so the
    # sections can be measured in several sittings (--sections) and the page still says where each row came from.
    run = doc.setdefault(slot, {"meta": {}, "sections": {}})
    runs = run["meta"].setdefault("runs", [])
    runs.append(this)
    run["meta"].update({k: v for k, v in this.items() if k != "sections"})
    started, others = time.time(), timing.OtherWork()

    def save(section, rows):
        merge(run["sections"], section, rows, len(runs) - 1)
        this["sections"] = sorted(set(this["sections"]) | {section})
        this.update(elapsed_s=time.time() - started, load_end=timing.load_average(), other_cores=others.cores())
        run["meta"].update({k: this[k] for k in ("elapsed_s", "load_end", "other_cores")})
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmarks.json").write_text(json.dumps(doc, indent=1, default=str))

    measure_all(core, args, plan, key, set(args.sections.split(",")), timing.Budget(plan["budget_min"] * 60),
                work, save, list(run["sections"].get("unet_step", [])))
    print(f"written: {page.write(doc, out)}")
    return 0


def measure_all(core, args, plan, key, sections, budget, work, save, known) -> None:
    """known: the step rows already in benchmarks.json, which predict steps this run does not measure."""
    import comfy.model_management
    import torch
    from bench import attn1, breakdown, ladder_stage, models, peers, tiled_vae, unet_step

    tiny = key in ("quick", "smoke")
    device = models.device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n = lambda px: plan["steps_n"] if px < plan.get("repeat_below_px", float("inf")) else 1
    if "attn1" in sections:
        sides = {family: {dim: [s for s in ss if attn1.pixels(dim, s) <= (plan.get("attn1_max_px") or 1 << 30)]
                          for dim, ss in widths.items()}
                 for family, widths in getattr(attn1, plan["attn1"]).items()
                 if family in plan.get("attn1_layouts", ["sd15", "sdxl"])}
        save("attn1", [r for d in plan["dtypes"] for r in attn1.run(core, device, getattr(torch, d), sides,
                                                                     plan["attn1_n"], budget, plan["max_call_s"])])
    steps, shares = [], []

    def predict_step(family, pixels, variant="linfusion"):
        """A step's time from the family's measured plain steps (this run's, else the json's): a power law
        through the two largest sizes measured, or linear (LinFusion) / quadratic (softmax) from one."""
        base = "sdpa" if variant.startswith("sdpa") else "linfusion"
        done = {r["px"] ** 2: r["median_s"] for r in known + steps
                if r.get("family") == family and r.get("variant") == base and "median_s" in r}
        if not done:
            return None
        (p0, t0), (p1, t1) = sorted(done.items())[-2:] if len(done) > 1 else [(None, None)] + list(done.items())
        power = math.log(t1 / t0) / math.log(p1 / p0) if p0 else 1 if base == "linfusion" else 2
        return t1 * (pixels / p1) ** max(1.0, power)

    for family in ("sd15", "sdxl"):
        if not ({family, "breakdown"} & sections or (family == "sd15" and sections & {
                "low_memory", "tiled_unet", "peers", "ladder", "tiled_vae", "controlnet"})):
            continue
        base = models.build(family, tiny, dtype)
        weights = models.linfusion_weights(core, base, family, work / "linfusion" / family)
        step = lambda sizes, variants: unet_step.run(core, base, weights, family, sizes, variants, n, budget,
                                                     plan["max_step_s"], plan["tile"])
        if family in sections:
            steps += step(plan[family], ["linfusion", "sdpa"])
            save("unet_step", steps)
        vae = models.vae(tiny) if family == "sd15" else None       # ComfyUI picks the VAE's dtype, as for a user
        if family == "sd15":
            if "low_memory" in sections and plan["low_memory"]:
                save("low_memory", step(plan["low_memory"], ["linfusion", "linfusion+low-memory"])
                     + step(plan["low_memory"][:1], ["sdpa", "sdpa+low-memory"]))
            if "tiled_unet" in sections and plan["tiled_unet"]:
                save("tiled_unet", step(plan["tiled_unet"], ["linfusion", "linfusion+tiled"]))
            if "tiled_vae" in sections and plan["tiled_vae"]:
                save("tiled_vae", tiled_vae.run(core, vae, plan["tiled_vae"], plan["vae_tile"], n, budget))
            if "peers" in sections and plan["peers"]:
                save("peers", peers.run({"official_linfusion": args.official_linfusion,
                                         "tiled_diffusion": args.tiled_diffusion}, base, weights, family,
                                        plan["peers"], n, budget, tiny))
            if "controlnet" in sections and plan["controlnet"]:
                save("controlnet", controlnet_rows(core, plan["controlnet"], device, tiny))
            if "ladder" in sections and plan["ladder"]:
                save("ladder", ladder_stage.run(core, base, weights, vae, plan["ladder"], plan["tile"],
                                                plan["vae_tile"], budget, predict_step))
        if "breakdown" in sections and key not in ("cuda", "smoke"):
            cnet = {family: models.controlnet(family, tiny, dtype)} if family == "sd15" else {}
            shares += breakdown.run(core, family, base, weights, vae or models.vae(tiny), cnet, tiny, budget,
                                    predict_step, plan["breakdown_max_s"])
            save("breakdown", shares)
        del base, weights, vae
        comfy.model_management.unload_all_models()       # ComfyUI keeps loaded MODELs; SDXL needs the room
        gc.collect()


def merge(sections: dict, section: str, rows: list[dict], run_index: int) -> None:
    """The section's rows of this run replace the earlier rows they re-measure: those of the same family at the
    same size (px) and width (dim) where the new rows have them (a step re-measured at 512 and 1024 px keeps
    the earlier 2048 px row with the run that measured it), all of the family's rows where they have neither,
    and every earlier row without a family (sections that have none, skips)."""
    for r in rows:
        r.setdefault("run", run_index)
    same = lambda old, new: old.get("family") == new.get("family") and all(
        old.get(k) == new[k] for k in ("px", "dim") if k in new)
    sections[section] = [r for r in sections.get(section, [])
                         if r.get("family") is not None and not any(same(r, q) for q in rows)] + rows


def controlnet_rows(core, sizes, device, quick) -> list[dict]:
    """Workflow 4's step with a softmax vs a LinFusion ControlNet (bench/controlnet_step.py)."""
    try:
        from bench import controlnet_step
        return controlnet_step.run(sizes, core=core, device=device, quick=quick)
    except Exception as e:       # its interface is its own; a mismatch is reported on the page, not fatal
        log.exception("[LinFusion] bench controlnet_step failed")
        return [{"skipped": f"bench/controlnet_step failed: {type(e).__name__}: {str(e)[:160]}"}]


if __name__ == "__main__":
    sys.exit(main())

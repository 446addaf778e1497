"""Run every benchmark in one process inside the real ComfyUI host and write docs/benchmarks.md.

    python3 scripts/comfy_host.py python bench/run_all.py            # full run, ~30 min on 2 idle CPU cores
    python3 scripts/comfy_host.py python bench/run_all.py --max-step-s 900 --max-call-s 30   # docs' run, 37 min
    python3 scripts/comfy_host.py python bench/run_all.py --quick    # < 1 min smoke run, output to a temp dir

ComfyUI is booted by tests/comfy_harness.py (ComfyUI's own custom-node loader loads this checkout), so the
LinFusion nodes and modules measured are the ones a user's ComfyUI runs.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

log = logging.getLogger("LinFusion")

def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run for CI)")
    p.add_argument("--out", type=Path, help="where benchmarks.md, plots and json go "
                   "(default: docs/ for a full run, a temporary folder for --quick)")
    p.add_argument("--max-call-s", type=float, help="skip attn1 calls predicted to take longer")
    p.add_argument("--max-step-s", type=float, help="skip UNet steps predicted to take longer")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a machine "
                   "shared with other busy jobs, fewer threads than cores avoids OpenMP threads spinning at "
                   "barriers while their partners wait to be scheduled")
    p.add_argument("--sd15-sizes", type=_ints, help="SD1.5 step sizes in px (default 512,768,1024,1536,2048)")
    p.add_argument("--sdxl-sizes", type=_ints, help="SDXL step sizes in px (default 512,1024)")
    p.add_argument("--sampling", type=_ints, help="px,steps of the sampling run (default 768,4)")
    p.add_argument("--label", help="what code was measured, when the checkout is not a git repository")
    p.add_argument("--from-json", type=Path, help="only rebuild the page and plots from a benchmarks.json")
    p.add_argument("--note", help="with --from-json: a sentence for the page's opening paragraph (e.g. a "
                   "measurement of a skipped size taken by another bench command)")
    p.add_argument("--variants", help="subset of linfusion,sdpa,no_attn1,default for the SD1.5 steps")
    p.add_argument("--sections", default="attn1,sd15,sdxl,sampling",
                   help="comma-separated subset of attn1,sd15,sdxl,sampling")
    return p.parse_args(argv)


def boot_host(model_root: Path):
    from comfy_harness import get_host
    return get_host(model_root)


def main(argv=None) -> int:
    args = parse(argv)
    # ComfyUI's boot chatter stays at WARNING; the benchmark's own progress lines are INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    quick = args.quick
    if args.from_json:
        from bench import summary
        res = json.loads(args.from_json.read_text())
        if args.note:
            res["runs_note"] = args.note
        summary.finish(res)
        page = summary.write_all(res, args.out or args.from_json.parent, res.get("command", "?"))
        print(summary.console(res))
        print(f"\nwritten: {page}")
        return 0
    max_call_s = args.max_call_s or (1.5 if quick else 12.0)
    max_step_s = args.max_step_s or (6.0 if quick else 300.0)  # 300 s: the LinFusion step at 2048 px runs
    sections = set(args.sections.split(","))
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="linfusion-bench-")) if quick else REPO / "docs")
    work = Path(tempfile.mkdtemp(prefix="linfusion-bench-models-"))
    started = time.time()

    host = boot_host(work)
    import folder_paths
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from bench import attention_bench, machine, summary, unet_bench, unet_models
    from bench.linfusion_adapter import linfusion_state_dict, write_hub_folder

    core = importlib.import_module(host.extension_module.__name__ + ".linfusion_core")
    # The host is booted with --cpu, so the UNet sections always run on the CPU; attn1 uses CUDA if present.
    attn_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cpu = torch.device("cpu")
    res = {"mode": "quick" if quick else "full", "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine.describe(attn_device),
           "attn1": [], "steps": [], "sampling": [], "exponents": {},
           "limits": {"max_call_s": max_call_s, "max_step_s": max_step_s}}
    res["machine"]["code measured"] = args.label or machine.code_version(REPO)
    res["gemm"] = machine.gemm_peak_flops(attn_device, quick=quick)
    res["gemm"]["samples"] = [res["gemm"]["peak_flops"]]
    if attn_device.type == "cuda":
        res["gemm_cpu"] = machine.gemm_peak_flops(cpu, quick=True)
    log.info("[LinFusion] bench GEMM peak %.1f GFLOP/s", res["gemm"]["peak_flops"] / 1e9)

    command = "python3 scripts/comfy_host.py python bench/run_all.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    res["command"] = command.strip()
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint():
        """Raw results so far, so a crash or a stop late in a long run loses nothing (see --from-json)."""
        res["elapsed_s"] = time.time() - started
        (out_dir / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str))

    if "attn1" in sections:
        def remeasure_gemm():
            res["gemm"]["samples"].append(machine.gemm_peak_flops(attn_device, quick=quick)["peak_flops"])
        res["attn1"] = attention_bench.run(core, attn_device, remeasure_gemm, quick=quick, max_call_s=max_call_s)
        remeasure_gemm()
        checkpoint()
    folder_paths.add_model_folder_path("linfusion", str(work / "linfusion"))

    def linfusion_name(patcher, family, divisor):
        config, sd = linfusion_state_dict(patcher, divisor)
        write_hub_folder(work / "linfusion" / f"bench-{family}", config, sd)
        listed = host.nodes.NODE_CLASS_MAPPINGS.get("LinFusionLoader")
        if listed is None:
            return None
        names = listed.INPUT_TYPES()["required"]["linfusion_name"][0]
        return next((n for n in names if f"bench-{family}" in n), None)

    if {"sd15", "sampling"} & sections:
        patcher = unet_models.build_model_patcher("sd15", cpu)
        name = linfusion_name(patcher, "sd15", None)
        sizes = args.sd15_sizes or ([256, 384] if quick else [512, 768, 1024, 1536, 2048])
        wanted = ["linfusion", "sdpa"] if quick else ["linfusion", "sdpa", "no_attn1", "default"]
        if args.variants:
            wanted = [v for v in wanted if v in args.variants.split(",")]
        models = unet_bench.variants(patcher, name, cpu, wanted)
        only = {"default": sizes[:1], "no_attn1": sizes[:1]}
        if "sd15" in sections:
            unet_bench.step_sweep(models, "sd15", sizes, cpu, max_step_s=max_step_s, quick=quick, only=only,
                                  on_row=lambda row: (res["steps"].append(row), checkpoint()))
        if "sampling" in sections:
            px, steps = args.sampling or ((256, 2) if quick else (768, 4))
            res["sampling"] = unet_bench.sampling_run({k: models[k] for k in ("linfusion", "sdpa")},
                                                      "sd15", px, steps, cpu)
            checkpoint()
        del models, patcher
        gc.collect()

    if "sdxl" not in sections or quick:
        res["steps"].append({"family": "sdxl", "pixels": 1024, "variant": "linfusion",
                             "skipped": "not part of this run"})
    else:
        _sdxl(res, args, cpu, linfusion_name, max_step_s, checkpoint)

    res["machine"]["load average (1 min) at end"] = f"{os.getloadavg()[0]:.1f}"
    checkpoint()
    summary.finish(res)
    page = summary.write_all(res, out_dir, res["command"])
    print(summary.console(res))
    print(f"\nwritten: {page}")
    return 0


def _sdxl(res, args, cpu, linfusion_name, max_step_s, checkpoint) -> None:
    from bench import unet_bench, unet_models

    ok, why = unet_bench.fits_in_memory("sdxl")
    if not ok:
        res["steps"].append({"family": "sdxl", "pixels": 1024, "variant": "linfusion",
                             "skipped": f"not enough memory ({why})"})
        return
    patcher = unet_models.build_model_patcher("sdxl", cpu)
    name = linfusion_name(patcher, "sdxl", 16)
    models = unet_bench.variants(patcher, name, cpu, ["linfusion", "sdpa"])
    res["steps"] += unet_bench.step_sweep(models, "sdxl", args.sdxl_sizes or [512, 1024], cpu,
                                          max_step_s=max_step_s, quick=False)
    checkpoint()
    del models, patcher
    gc.collect()


if __name__ == "__main__":
    sys.exit(main())

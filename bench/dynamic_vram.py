"""ComfyUI 0.33's GPU default, DynamicVRAM, checked where it really runs: pass or fail per row.

SD 1.5 and SDXL (their real architectures, random weights) stored in fp16 and bf16, each with an fp16 and an
fp32 LinFusion file, through Apply LinFusion (min_tokens manual and auto), the Tiled UNet (against the
untiled UNet) and one ladder stage (Progressive Upscale, exact tiled VAE). ComfyUI is booted without --cpu,
so on an NVIDIA GPU its own main.py turns DynamicVRAM on (comfy-aimdo, ModelPatcherDynamic); the result says
whether it was on. Rows go to docs/dynamic_vram_gpu.json and the table in docs/dynamic_vram_gpu.md; `--plan`
writes that table with every row unrun (no device lent), so the page always says what has not run.

    python3 scripts/comfy_host.py python bench/dynamic_vram.py --device cuda          # bench/gpu.sh runs it
    python3 scripts/comfy_host.py python bench/dynamic_vram.py --device cpu --quick --out /tmp/x   # the code path
    python3 scripts/comfy_host.py python bench/dynamic_vram.py --plan                 # the table, every row unrun
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FAMILIES = ("sd15", "sdxl")
STORAGE = ("float16", "bfloat16")
FILES = ("float16", "float32")
CHECKS = ("manual", "auto", "tiled", "ladder")
# Tiled vs untiled: the same sums in another order, rounded in the stored dtype (bf16 keeps 8 bits).
TILED_TOLERANCE = {"float16": 2e-2, "bfloat16": 8e-2}


def rows_planned() -> list[dict]:
    return [{"family": f, "storage": s, "file": w, "check": c, "result": "unrun"}
            for f in FAMILIES for s in STORAGE for w in FILES for c in CHECKS]


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dynamic_vram_gpu.json").write_text(json.dumps(doc, indent=1) + "\n")
    meta = doc.get("meta", {})
    lines = ["# DynamicVRAM on a GPU: pass or fail", "",
             "Written by `bench/dynamic_vram.py` (see its docstring); `unrun` rows have not run on a GPU yet.", "",
             f"- device: {meta.get('device', 'none lent')}; ComfyUI {meta.get('comfyui', '-')}; "
             f"DynamicVRAM on: {meta.get('dynamic_vram', '-')}; UNet patcher: {meta.get('patcher', '-')}; "
             f"run: {meta.get('started', '-')}", "",
             "| family | model stored | LinFusion file | check | result | detail |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['family']} | {r['storage']} | {r['file']} | {r['check']} | {r['result']} | "
                     f"{r.get('detail', '')} |")
    (out / "dynamic_vram_gpu.md").write_text("\n".join(lines) + "\n")


def check(row: dict, fn) -> None:
    started = time.perf_counter()
    try:
        detail = fn()
        row.update(result="pass", detail=detail or "")
    except Exception as e:   # a failing row is the finding: record it, go on with the others
        row.update(result="FAIL", detail=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - started, 2)


def run(core, quick: bool, work: Path) -> list[dict]:
    import torch

    import comfy.model_management
    import nodes
    from bench import models

    px = 256 if quick else 1024
    rows = []
    for family in FAMILIES:
        for storage in STORAGE:
            dtype = getattr(torch, storage)
            base = models.build(family, quick, dtype)
            for file in FILES:
                weights = models.linfusion_weights(core, base, family, work / f"{family}-{file}")
                weights = core.weights.checkpoint.LinFusionWeights(
                    weights.source, weights.modules,
                    {k: v.to(getattr(torch, file)) for k, v in weights.state_dict.items()}, weights.config_source)
                by_check = {r["check"]: r for r in ({"family": family, "storage": storage, "file": file,
                                                     "check": c} for c in CHECKS)}

                def finite(model):
                    out = models.sample(model, family, px)
                    if not torch.isfinite(out).all():
                        raise FloatingPointError("non-finite latent")
                    return out

                def manual():
                    finite(core.patching.patch.apply_linfusion(base, weights)[0])

                def auto():
                    model, info = core.patching.patch.apply_linfusion(base, weights, min_tokens="auto")
                    finite(model)
                    return info.split("min_tokens auto", 1)[-1][:200]
                check(by_check["manual"], manual)
                check(by_check["auto"], auto)

                def tiled():
                    plain = finite(core.patching.patch.apply_linfusion(base, weights)[0])
                    model = core.tiling.tiled_unet_patch.apply_tiled_unet(core.patching.patch.apply_linfusion(base, weights)[0],
                                                                   64, "cpu", progress=False)
                    err = float((finite(model) - plain).abs().max() / plain.abs().max())
                    if err > TILED_TOLERANCE[storage]:
                        raise AssertionError(f"tiled differs from untiled by {err:.2e} "
                                             f"(> {TILED_TOLERANCE[storage]})")
                    return f"max rel. error {err:.1e}"
                check(by_check["tiled"], tiled)

                def ladder():
                    vae = models.vae(quick)
                    positive, negative = models.conditioning(family)
                    latent = torch.randn(1, 4, px // 16, px // 16, generator=torch.Generator().manual_seed(0))
                    out, _ = nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]().upscale(
                        core.patching.patch.apply_linfusion(base, weights)[0], positive, negative, vae,
                        latent={"samples": latent}, seed=1, stages=1, target_width=0, target_height=0,
                        ladder=family, strengths="", base_steps=4, cfg=5.0, sampler_name="euler",
                        scheduler="normal", upscale_in="pixels", demofusion=False, anchoring="off",
                        vae_tile_size=256, return_stage_images=False)
                    if not torch.isfinite(out["samples"]).all():
                        raise FloatingPointError("non-finite latent")
                    return f"{px // 2} -> {px} px"
                check(by_check["ladder"], ladder)
                rows += by_check.values()
                print(json.dumps(list(by_check.values())), flush=True)
            base = None   # the next storage dtype builds its own
            comfy.model_management.unload_all_models()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="small layouts and sizes (the code path only)")
    p.add_argument("--plan", action="store_true", help="write the table with every row unrun, boot nothing")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    args = p.parse_args(argv)
    if args.plan:
        write({"meta": {}, "rows": rows_planned()}, args.out)
        return 0
    import torch
    from scratch import scratch_dir

    from bench.run_all import boot   # without --cpu when the device is cuda: ComfyUI's own GPU defaults
    work = scratch_dir("linfusion-dynamic-vram-")
    host = boot(args.device, work)
    import comfy.memory_management
    import comfy.model_patcher
    import comfyui_version
    from bench import models

    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "comfyui": comfyui_version.__version__,
            "dynamic_vram": bool(getattr(comfy.memory_management, "aimdo_enabled", False)),
            "patcher": models.patcher_class().__name__, "quick": args.quick,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = run(host.import_core(), args.quick, work)
    write({"meta": meta, "rows": rows}, args.out)
    failed = [r for r in rows if r["result"] != "pass"]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

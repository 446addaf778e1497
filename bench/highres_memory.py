"""Peak memory and time of one sampling step (one cond+uncond UNet evaluation) vs resolution: normal vs
LinFusion Low-Memory Mode, with ComfyUI's softmax attention and with a linear attn1.

Real SD 1.5 UNet architecture (860 M params, random weights, fp32) through ComfyUI's own sampling path
(comfy.sample.sample, one euler step), so the low-memory wrappers and patches act exactly as in a workflow.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs before each run) minus the RSS before it.

    python3 scripts/comfy_host.py python bench/highres_memory.py --sizes 512 1024 2048 --attention linear softmax

takes ~45 min on 2 idle CPU cores (the two softmax steps at 2048 px are most of it); on a GPU add --device cuda
and larger sizes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def boot_comfy(device: str, attention: str) -> None:
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    saved = sys.argv
    sys.argv = ["main.py", "--disable-auto-launch"] + (["--cpu"] if device == "cpu" else [])
    if attention == "sdpa":
        sys.argv.append("--use-pytorch-cross-attention")
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the argv above)
    sys.argv = saved
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))


def read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device) -> int:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # Give freed heap back to the OS first: otherwise a run can grow into memory an earlier run left resident
    # and show (almost) no growth at all.
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return read_status("VmRSS")


def peak_since(device, start: int) -> int:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return read_status("VmHWM") - start


def linear_attn1():
    """attn1 replacement on the projected q, k, v: the core's linear attention (phi = elu + 1, fp32 state,
    chunked), without LinFusion's query/key MLPs: the memory and time of the attention itself."""
    from linfusion_core.attention import linear_attention

    return lambda q, k, v, extra: linear_attention(q, k, v, extra["n_heads"]), "linfusion_core.linear_attention"


def with_linear_attn1(model, attn):
    m = model.clone()
    unet = m.model.diffusion_model
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            parts = name.split(".")  # input_blocks.1.1.transformer_blocks.0
            block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
            number = 0 if block == "middle" else int(parts[1])
            m.set_model_attn1_replace(attn, block, number, int(parts[-1]))
    return m


def one_step(model, size: int, device):
    import torch
    import comfy.sample
    import highres_models

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    neg = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
    start = reset_peak(device)
    t0 = time.perf_counter()
    comfy.sample.sample(model, noise, 1, 7.5, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, peak_since(device, start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--attention", nargs="+", default=["softmax", "linear"], choices=["softmax", "linear"])
    parser.add_argument("--softmax-max-size", type=int, default=2048,
                        help="skip softmax attention above this size (N^2 cost: ~15 min per 2048 px step on 2 CPU "
                             "cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="sdpa", choices=["sdpa", "comfy-default"],
                        help="softmax attention: PyTorch SDPA or ComfyUI's default for the device")
    parser.add_argument("--ff-chunk-tokens", type=int, default=4096)
    args = parser.parse_args()

    boot_comfy(args.device, args.backend)
    import torch
    import comfy.model_management
    import highres_models
    from linfusion_core.low_memory import LowMemoryOptions

    torch.manual_seed(0)
    device = comfy.model_management.get_torch_device()
    base = highres_models.unet_patcher(highres_models.SD15_UNET, seed=0)
    linear, linear_name = linear_attn1()
    low = LowMemoryOptions(sequential_cond=True, ff_chunk_tokens=args.ff_chunk_tokens, inplace_silu=True,
                           park_skips=device.type == "cuda")
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"softmax backend {args.backend}, linear attn1: {linear_name}", flush=True)
    print("| attn1 | size | mode | step s | peak MiB | low/normal mem | low/normal time |")
    print("|---|---|---|---|---|---|---|", flush=True)
    one_step(base, 256, device)  # load the model and warm up kernels once
    for attention in args.attention:
        variant = base if attention == "softmax" else with_linear_attn1(base, linear)
        for size in args.sizes:
            if attention == "softmax" and size > args.softmax_max_size:
                continue
            results = {}
            for mode, model in (("normal", variant), ("low-memory", low.apply(variant))):
                seconds, peak = one_step(model, size, device)
                results[mode] = (seconds, peak)
                extra = ""
                if mode == "low-memory":
                    (t_n, p_n), (t_l, p_l) = results["normal"], results["low-memory"]
                    extra = f" {p_l / max(p_n, 1):.2f} | {t_l / t_n:.2f} |"
                else:
                    extra = " | |"
                print(f"| {attention} | {size} | {mode} | {seconds:.1f} | {peak / 2**20:.0f} |{extra}", flush=True)


if __name__ == "__main__":
    main()

"""`min_tokens = auto`: where on this device and dtype softmax attention is faster than LinFusion.

Both modules share the q/k/v/out projections; LinFusion adds its query/key MLPs and the d x d state work
(linear in the token count N), softmax adds Q K^T and P V (quadratic in N). So below some N per width
softmax is the faster one (LinFusion-1-5's C-wide MLPs put it near N ~ 2C on a CPU; LinFusion-XL's narrow
ones far lower). This measures that crossover once per (device, dtype, width, heads, MLP width, softmax
function) and caches it for the process: one LinFusion module (the file's own weights for that width) and one
ComfyUI CrossAttention (random weights: timing does not depend on the values), batch 1, each timed
interleaved, the minimum of RUNS, at a ladder of token counts (PROBE_TOKENS).

The probes must sit where the kernels, not their launches, set the time. On a CPU that is the case from a
hundred tokens on. On a GPU both modules take a flat ~1-2 ms up to a few thousand tokens (launch-bound on an
H200: docs/benchmarks.json), so a power law through two such points says nothing (it answered the cap,
65,536 tokens, for 9 of 10 width/dtype pairs whose measured crossover is ~10-16K). There the ladder starts at
4096 tokens and doubles until LinFusion is the faster one (at least two sizes, at most 65,536), and the
crossover is read off the segment where the two cross (`crossover_from_ladder`): between two probes that
bracket it, or extrapolated from the first or last two. A softmax that runs out of memory at a probe counts as
infinitely slow there.
"""
from __future__ import annotations

import math
import time

import torch

# Token counts the two modules are timed at: small enough on a CPU to take a fraction of a second per width;
# on a GPU, where the time is flat (launches) up to a few thousand tokens, a ladder from 4096 that stops at
# the first size where LinFusion is faster (after two sizes at least).
PROBE_TOKENS = {"cpu": (128, 512), "other": (4096, 8192, 16384, 32768, 65536)}
RUNS = 2
CAP = 16
_CACHE: dict[tuple, int] = {}


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return run


def loaded(build, state_dict: dict | None, device, dtype) -> torch.nn.Module:
    """build(operations, device, dtype) made and filled through load_state_dict: under ComfyUI 0.33's DynamicVRAM
    comfy.ops layers have no weight until a state dict is loaded, so filling parameters() would fill nothing.
    Without `state_dict`, random variance-preserving values of the module's own shapes (read from a meta-device
    copy in plain torch layers, which holds no memory)."""
    import comfy.ops

    if state_dict is None:
        gen = torch.Generator().manual_seed(0)
        shapes = build(torch.nn, torch.device("meta"), dtype).state_dict()
        state_dict = {k: torch.randn(v.shape, generator=gen) / math.sqrt(v.shape[-1]) if v.ndim > 1
                      else torch.ones(v.shape) for k, v in shapes.items()}
    # Built in `dtype` (the classic layers keep their own dtype on load) and loaded in it (DynamicVRAM's keep
    # the loaded one).
    module = build(comfy.ops.disable_weight_init, device, dtype)
    module.load_state_dict({k: v.to(device, dtype) for k, v in state_dict.items()}, strict=True)
    return module.eval()


def crossover_from_probes(tokens: tuple[int, int], linear_s: tuple[float, float], softmax_s: tuple[float, float]) -> int:
    """The token count where the power laws through (tokens, linear_s) and (tokens, softmax_s) cross."""
    n1, n2 = tokens
    e_lin = math.log(linear_s[1] / linear_s[0]) / math.log(n2 / n1)
    e_soft = math.log(softmax_s[1] / softmax_s[0]) / math.log(n2 / n1)
    ratio = linear_s[0] / softmax_s[0]                       # > 1: softmax faster at n1
    if e_soft <= e_lin:
        return 0 if ratio <= 1 and linear_s[1] <= softmax_s[1] else CAP * n2
    return int(min(CAP * n2, max(0.0, n1 * ratio ** (1.0 / (e_soft - e_lin)))))


def crossover_from_ladder(tokens, linear_s, softmax_s) -> int:
    """The crossover from probes at increasing token counts (two or more): the power law through the two probes
    where LinFusion first becomes the faster one (the two that bracket the crossing); through the first two when
    it is faster from the start, the last two when it never is. A softmax time of inf (out of memory): LinFusion
    from the last size softmax ran at."""
    if len(tokens) < 2:
        raise ValueError("a crossover needs probes at two token counts at least")
    first = next((i for i in range(len(tokens)) if linear_s[i] <= softmax_s[i]), None)
    if first is not None and math.isinf(softmax_s[first]):
        return int(tokens[first - 1]) if first > 0 else 0
    i = len(tokens) - 2 if first is None else max(first - 1, 0)
    return crossover_from_probes(tuple(tokens[i:i + 2]), tuple(linear_s[i:i + 2]), tuple(softmax_s[i:i + 2]))


def _out_of_memory(error: Exception) -> bool:
    return isinstance(error, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(error)


@torch.inference_mode()
def crossover_tokens(dim: int, heads: int, mid_dim, device, dtype, transformer_options: dict | None = None,
                     linfusion_state: dict | None = None) -> int:
    """Tokens from which LinFusion is faster than the host's softmax attn1 at this width (cached).
    linfusion_state: the LinFusion file's module of this width (random weights of its shapes without it)."""
    import comfy.ldm.modules.attention as attention

    from .module import LinFusionAttention

    device = torch.device(device)
    override = (transformer_options or {}).get("optimized_attention_override")
    key = (str(device), str(dtype), dim, heads, mid_dim, override or attention.optimized_attention)
    if key in _CACHE:
        return _CACHE[key]
    lin = loaded(lambda ops, dev, dt: LinFusionAttention(dim, heads, mid_dim, dtype=dt, device=dev, operations=ops),
                 linfusion_state, device, dtype)
    soft = loaded(lambda ops, dev, dt: attention.CrossAttention(dim, heads=heads, dim_head=dim // heads, dtype=dt,
                                                                device=dev, operations=ops), None, device, dtype)
    options = {"optimized_attention_override": override} if override else {}
    ladder = PROBE_TOKENS["cpu" if device.type == "cpu" else "other"]
    timed = _timer(device)
    best, probed = {}, []
    for n in ladder:
        x = torch.randn(1, n, dim, device=device, dtype=dtype)
        calls = {"linear": lambda: lin(x), "softmax": lambda: soft(x, transformer_options=options)}
        calls["linear"]()                         # warm-up at this size
        try:
            calls["softmax"]()
        except Exception as error:                # softmax's N x N at a large probe, on a small GPU
            if not (_out_of_memory(error) and probed):
                raise
            del calls["softmax"]
            best["softmax", n] = math.inf
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in range(RUNS):                     # interleaved, the minimum of RUNS each
            for name in (calls if r % 2 == 0 else list(calls)[::-1]):
                t = timed(calls[name])
                best[name, n] = min(best.get((name, n), t), t)
        probed.append(n)
        del x, calls
        if len(probed) >= 2 and best["linear", n] <= best["softmax", n]:
            break
    found = crossover_from_ladder(probed, [best["linear", n] for n in probed], [best["softmax", n] for n in probed])
    _CACHE[key] = found
    return found

"""The fast path (attention/fast_path.py) against the reference path of the same module, which paths run when, the
packed-weight cache, ComfyUI's per-call weight casting, op counts and Dynamo. No timing is asserted."""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.op_count import compute_ops
from test_module import random_module, reference_module_forward


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class Paths:
    """Counts the calls of each path of a module: the fast one (fast_forward) and the reference (attend)."""

    def __init__(self, core, module, monkeypatch):
        self.fast = self.reference = 0
        fast_forward, attend = core.attention.fast_path.fast_forward, module.attend

        def fast(*args, **kwargs):
            self.fast += 1
            return fast_forward(*args, **kwargs)

        def reference(*args, **kwargs):
            self.reference += 1
            return attend(*args, **kwargs)
        monkeypatch.setattr(core.attention.fast_path, "fast_forward", fast)
        module.attend = reference


def both_paths(module, x, **kwargs):
    with torch.inference_mode():
        fast = module(x, **kwargs)
        module.fast_path = False
        try:
            reference = module(x, **kwargs)
        finally:
            module.fast_path = True
    return fast, reference


@pytest.mark.parametrize("dim,heads,mid,b,n", [
    (320, 8, None, 2, 256), (640, 10, 40, 2, 300), (1280, 20, 80, 2, 64), (64, 2, -1, 3, 77), (64, 4, 32, 5, 64),
    (64, 4, 32, 1, 1), (96, 3, 48, 1, 200)])
def test_fast_path_equals_the_reference_path_in_fp32(core, monkeypatch, dim, heads, mid, b, n):
    module = random_module(core, dim, heads, mid).requires_grad_(False)
    paths = Paths(core, module, monkeypatch)
    x = torch.randn(b, n, dim, generator=torch.Generator().manual_seed(1))
    fast, reference = both_paths(module, x)
    assert (paths.fast, paths.reference) == (1, 1)
    assert fast.shape == x.shape and fast.dtype == torch.float32
    assert rel(fast, reference) <= 1e-6
    # and the formula itself (projections in fp32, attention in fp64)
    assert rel(fast, reference_module_forward(module.state_dict(), x, x, x, heads)) <= 2e-6


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dim,heads,mid", [(320, 8, None), (640, 10, 40), (64, 2, -1)])
def test_fast_path_in_half_precision_stays_within_its_bounds(core, dtype, bound, dim, heads, mid):
    """fp16/bf16 weights and tokens against the fp32 module: max error / max |output| within the bound (measured
    about 8e-4 for fp16 and 7e-3 for bf16, as the reference path's own half precision gives)."""
    module = random_module(core, dim, heads, mid).requires_grad_(False)
    x = torch.randn(2, 256, dim, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fp32 = module(x)
    half = module.to(dtype)
    fast, reference = both_paths(half, x.to(dtype))
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    assert half._linfusion_packed is not None and half._linfusion_packed.dtype == dtype
    assert rel(fast, fp32) <= bound
    assert rel(reference, fp32) <= bound


def test_which_path_runs(core, monkeypatch):
    """Fast: plain self-attention without autograd within the size bound. Reference: keys or values other than
    the queries, an explicit chunk size the batch exceeds, autograd, a call over the bound, fast_path off."""
    module = random_module(core, 64, 4, 32).requires_grad_(False)
    paths = Paths(core, module, monkeypatch)
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(3))
    other = torch.randn(2, 40, 64)

    def runs(mode="inference", **kwargs):
        before = (paths.fast, paths.reference)
        with {"inference": torch.inference_mode, "grad": torch.enable_grad, "no_grad": torch.no_grad}[mode]():
            module(x, **kwargs)
        return "fast" if paths.fast > before[0] else "reference" if paths.reference > before[1] else None

    assert runs() == "fast"
    assert runs(context=x, value=x) == "fast"                      # attn1_patch's explicit self-attention
    assert runs(context=other) == "reference"
    assert runs(value=other) == "reference"
    assert runs(chunk_size=80) == "fast"                          # 2 x 40 rows fit a chunk of 80
    assert runs(chunk_size=79) == "reference"
    module.chunk_size = 50
    assert runs() == "reference"
    module.chunk_size = None
    monkeypatch.setattr(core.attention.fast_path, "FAST_MAX_ELEMENTS", 2 * 40 * 64 - 1)
    assert runs() == "reference"
    monkeypatch.setattr(core.attention.fast_path, "FAST_MAX_ELEMENTS", 2 * 40 * 64)
    assert runs() == "fast"
    module.fast_path = False
    assert runs() == "reference"
    module.fast_path = True
    module.requires_grad_(True)
    assert runs("grad") == "reference"                             # autograd: the reference path's backward
    assert runs("no_grad") == "fast"


def test_whole_batch_in_one_pass_where_the_reference_splits_per_image(core, monkeypatch):
    """No per-image split while a batch fits: cond + uncond at 16384 tokens is one pass, where the reference
    path's default chunk (16384 tokens) takes it image by image."""
    module = random_module(core, 64, 4, 16).requires_grad_(False)
    seen = []
    fast_forward = core.attention.fast_path.fast_forward
    monkeypatch.setattr(core.attention.fast_path, "fast_forward", lambda p, x: seen.append(tuple(x.shape)) or fast_forward(p, x))
    x = torch.randn(2, 16384, 64, generator=torch.Generator().manual_seed(4))
    fast, reference = both_paths(module, x)
    assert seen == [(2, 16384, 64)]
    assert core.attention.reference.token_blocks(2, 16384, core.attention.reference.DEFAULT_CHUNK_SIZE) == [(0, 1, 0, 16384), (1, 2, 0, 16384)]
    assert rel(fast, reference) <= 1e-6


def test_packed_weights_are_cached_and_rebuilt_when_a_weight_changes(core, monkeypatch):
    module = random_module(core, 64, 4, 32).requires_grad_(False)
    packs = []
    pack = core.attention.fast_path.pack
    monkeypatch.setattr(core.attention.fast_path, "pack", lambda *a: packs.append(a[1:]) or pack(*a))
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(5))

    def check():
        fast, reference = both_paths(module, x)
        assert rel(fast, reference) <= 1e-6
        return fast

    first = check()
    check()
    assert len(packs) == 1                                          # packed once, then cached
    with torch.no_grad():
        module.to_k_[3].weight.mul_(1.5)                            # in place (as a LoRA patch lands)
    changed = check()
    assert len(packs) == 2 and rel(changed, first) > 1e-3
    module.to_q.weight = torch.nn.Parameter(torch.randn(64, 64) / 8, requires_grad=False)   # replaced
    check()
    assert len(packs) == 3
    module.to(torch.float64)                                        # moved/cast: the cache is dropped at once
    assert module._linfusion_packed is None
    module.to(torch.float32)
    check()
    assert len(packs) == 4


def test_modules_built_under_inference_mode_pack_once(core, monkeypatch):
    """ComfyUI runs its nodes under torch.inference_mode, so Apply LinFusion's layers hold inference tensors,
    which have no version counter: the cache must still hold across calls (packing per call would fold the
    MLPs, a C x C x m GEMM, every time), and still see a tensor replaced or moved."""
    packs = []
    pack = core.attention.fast_path.pack
    monkeypatch.setattr(core.attention.fast_path, "pack", lambda *a: packs.append(1) or pack(*a))
    with torch.inference_mode():
        module = random_module(core, 64, 4, 32)
        assert module.to_q.weight.is_inference()
        x = torch.randn(2, 30, 64)
        first = module(x)
        for _ in range(3):
            assert torch.equal(module(x), first)
        assert len(packs) == 1
        module.to_k.weight = torch.nn.Parameter(module.to_k.weight * 1.5, requires_grad=False)
        changed = module(x)
        assert len(packs) == 2 and rel(changed, first) > 1e-3
        module.fast_path = False
        assert rel(changed, module(x)) <= 1e-6


def cast_module(core, plain, operations, dtype=torch.float32):
    """The same module in comfy.ops layers that ComfyUI casts per call, weights stored in `dtype`."""
    cast = core.attention.module.LinFusionAttention(plain.dim, plain.heads, plain.projection_mid_dim,
                                                    operations=operations, dtype=dtype)
    cast.load_state_dict({k: v.to(dtype) for k, v in plain.state_dict().items()})
    return cast.requires_grad_(False)


def test_cast_layers_handing_back_the_same_weights_run_the_fast_path(core, monkeypatch):
    """ComfyUI casts comfy.ops layers per call (0.33's DynamicVRAM, its default on NVIDIA, does it to every
    layer). Where the cast hands back the same tensors each call (DynamicVRAM's resident weights; here a
    manual-cast layer already in the input's device and dtype, which needs no copy) the fast path runs from them,
    packed once, and equals the module in plain layers."""
    import comfy.ops

    plain = random_module(core, 64, 4, 32).requires_grad_(False)
    cast = cast_module(core, plain, comfy.ops.manual_cast)
    assert all(getattr(layer, "comfy_cast_weights", False) for layer in cast.modules() if hasattr(layer, "weight"))
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(6))
    packs, casts = [], []
    pack, cast_bias_weight = core.attention.fast_path.pack, comfy.ops.cast_bias_weight
    monkeypatch.setattr(core.attention.fast_path, "pack", lambda *a: packs.append(a[0]) or pack(*a))
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda *a, **k: casts.append(1) or cast_bias_weight(*a, **k))
    with torch.inference_mode():
        expected = plain(x)
        paths = Paths(core, cast, monkeypatch)
        for _ in range(4):
            assert (cast(x) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    assert (paths.fast, paths.reference) == (4, 0)
    assert [m is cast for m in packs].count(True) == 1              # cached: the cast gave the same tensors
    assert len(casts) == 4 * 10                                     # every layer asked ComfyUI, every call
    assert cast._linfusion_packed.sources[0] is cast.to_q.weight


def test_cast_layers_handing_back_new_weights_each_call_fall_back_to_the_reference_path(core, monkeypatch):
    """A cast that makes new tensors each call (weights streamed in per call under low VRAM, here fp16 storage
    cast to fp32 compute) would be folded again each call: after fast_path.STREAMED_AFTER such calls the module
    runs the reference path, until the next sampler run (prepare). Both paths compute from the cast weights."""
    import comfy.ops

    fast_path = core.attention.fast_path
    plain = random_module(core, 64, 4, 32).requires_grad_(False)
    cast = cast_module(core, plain, comfy.ops.manual_cast, dtype=torch.float16)
    rounded = cast_module(core, cast, core.attention.module.default_operations(), dtype=torch.float32)
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = rounded(x)                                       # plain fp32 layers of the fp16 values
        paths = Paths(core, cast, monkeypatch)
        for _ in range(fast_path.STREAMED_AFTER + 2):
            assert (cast(x) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
        assert (paths.fast, paths.reference) == (fast_path.STREAMED_AFTER, 2)
        assert cast._linfusion_streamed and cast._linfusion_packed is None
        assert fast_path.prepare(cast) is False                     # a new sampler run tries again
        cast(x)
        assert (paths.fast, paths.reference) == (fast_path.STREAMED_AFTER + 1, 2)


def test_layers_with_weight_functions_apply_them_on_either_path(core, monkeypatch):
    """A LoRA weight function (as ComfyUI's hooks set it) applies on the fast path while it runs, and on the
    reference path after; a packed cache made before it was set is not used."""
    fast_path = core.attention.fast_path
    plain = random_module(core, 64, 4, 32).requires_grad_(False)
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        plain(x)
        before = plain._linfusion_packed
        assert before is not None
        paths = Paths(core, plain, monkeypatch)
        plain.to_v.weight_function = [lambda w: 2 * w]
        doubled = [plain(x) for _ in range(fast_path.STREAMED_AFTER + 1)]
        assert plain._linfusion_packed is not before
        assert (paths.fast, paths.reference) == (fast_path.STREAMED_AFTER, 1)
        plain.to_v.weight_function = []
        plain.to_v.weight.mul_(2)
        fast_path.prepare(plain)
        expected = plain(x)
    for out in doubled:
        assert (out - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_layers_on_another_device_or_dtype_take_the_reference_path(core):
    module = random_module(core, 64, 4, 32).requires_grad_(False)
    module.to_out[0].to(torch.float64)
    assert core.attention.fast_path.packed_weights(module, torch.device("cpu"), torch.float32) is None
    module.to_out[0].to(torch.float32)
    assert core.attention.fast_path.packed_weights(module, torch.device("cpu"), torch.float32) is not None
    assert core.attention.fast_path.packed_weights(module, torch.device("meta"), torch.float32) is None


@pytest.mark.parametrize("mid", [16, -1])
def test_one_attn1_call_dispatches_at_most_16_compute_ops(core, mid):
    """Counted with torch.profiler on the CPU, batch 2, comfy.ops layers as the model has them (the count does
    not depend on the sizes). Before issue #29: 32 (bench/op_count.py, docs/op_count.json)."""
    import comfy.ops

    module = core.attention.module.LinFusionAttention(64, 4, mid, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    x = torch.randn(2, 64, 64)
    with torch.inference_mode():
        module(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x)
    ops = compute_ops(prof.events())
    assert ops <= 16
    assert ops >= 8                                                 # the count sees the GEMMs at all


@pytest.mark.parametrize("fast", [True, False])
def test_both_paths_trace_without_graph_breaks(core, fast):
    """torch._dynamo.explain of one module call: one graph, no break, on either path (before: 5 graphs, 4
    breaks, from an out= into a strided view in the reference path's divide)."""
    import torch._dynamo

    module = random_module(core, 64, 4, 32).requires_grad_(False)
    module.fast_path = fast
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            module(x)                                               # packs (eagerly) where the fast path runs
            explained = torch._dynamo.explain(module)(x)
    finally:
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_apply_linfusion_packs_before_the_first_step_and_releases_after_the_run(core):
    """Apply LinFusion registers an ON_PRE_RUN callback that packs every plain module once the models are loaded,
    so a compiled model finds the cache instead of tracing the packing (and compiling a second graph), and an
    ON_CLEANUP one that drops the packed copies when the sampler is done (memory ComfyUI does not count)."""
    import comfy.model_management
    import comfy.patcher_extension

    from linfusion_models import build_patcher, linfusion_for

    base = build_patcher("sd15", seed=2)
    patched, _ = core.patching.patch.apply_linfusion(base, linfusion_for(core, base.model, seed=3))
    again, _ = core.patching.patch.apply_linfusion(patched, linfusion_for(core, base.model, seed=4))
    for call_type in (comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, comfy.patcher_extension.CallbacksMP.ON_CLEANUP):
        assert len(again.get_all_callbacks(call_type)) == 1                                  # replaced, not stacked
    comfy.model_management.load_models_gpu([patched] + patched.get_nested_additional_models())
    modules = core.patching.patch.linfusion_install(patched).modules_of(patched).blocks
    assert all(m._linfusion_packed is None for m in modules)
    patched.pre_run()
    assert all(m._linfusion_packed is not None for m in modules)
    patched.cleanup()
    assert all(m._linfusion_packed is None for m in modules)
    comfy.model_management.unload_all_models()

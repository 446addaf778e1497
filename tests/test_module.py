"""LinFusionAttention (comfy.ops layers, chunked) against an independent functional spelling of the module."""
import math

import pytest
import torch
import torch.nn.functional as F


def reference_module_forward(sd: dict, x, context, value, heads):
    """FACTS section 2 written with plain torch functionals and the reference attention."""
    def mlp(prefix, t):
        if f"{prefix}.0.weight" not in sd:
            return t  # projection_mid_dim -1: the official module uses nn.Identity, so q = to_q(2x)
        h = F.linear(t, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"])
        h = F.layer_norm(h, h.shape[-1:], sd[f"{prefix}.1.weight"], sd[f"{prefix}.1.bias"], eps=1e-5)
        h = F.leaky_relu(h, 0.01)
        return F.linear(h, sd[f"{prefix}.3.weight"], sd[f"{prefix}.3.bias"])

    q = F.linear(x + mlp("to_q_", x), sd["to_q.weight"])
    k = F.linear(context + mlp("to_k_", context), sd["to_k.weight"])
    v = F.linear(value, sd["to_v.weight"])
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).double() for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    nk = k.shape[2]
    s = (k.transpose(-1, -2) * nk ** -0.5) @ (v * nk ** -0.5)
    out = (q @ s) / (q @ k.mean(2, keepdim=True).transpose(-1, -2) + 1e-4)
    out = out.transpose(1, 2).reshape(b, n, c).float()
    return F.linear(out, sd["to_out.0.weight"], sd["to_out.0.bias"])


def random_module(core, dim, heads, mid, seed=0):
    module = core.attention.module.LinFusionAttention(dim, heads, mid)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if name.endswith(".1.weight") else r / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.02 * r)
    return module


HUB_KEYS = {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"} | {
    f"{b}.{i}.{p}" for b in ("to_q_", "to_k_") for i in (0, 1, 3) for p in ("weight", "bias")}


def test_submodule_names_are_the_hub_keys(core):
    assert set(core.attention.module.LinFusionAttention(64, 4).state_dict()) == HUB_KEYS
    assert set(core.attention.module.LinFusionAttention(64, 4, -1).state_dict()) == {k for k in HUB_KEYS if "_." not in k}
    import comfy.ops
    assert isinstance(core.attention.module.LinFusionAttention(64, 4).to_q, comfy.ops.CastWeightBiasOp)


@pytest.mark.parametrize("dim,heads,mid,b,n,chunk", [
    (320, 8, None, 2, 256, 100), (640, 10, 40, 2, 300, 4096), (64, 2, -1, 2, 513, 128),
    # chunk boundaries: the whole batch in one block (b*n = chunk), images grouped two by two, one image a
    # block (n = chunk), and an image one token over a chunk (n = chunk + 1) or one under (n = chunk - 1)
    (64, 4, 32, 2, 64, 128), (64, 4, 32, 5, 64, 128), (64, 4, 32, 3, 128, 128), (64, 4, 32, 3, 129, 128),
    (64, 4, 32, 3, 127, 128), (1280, 20, 80, 2, 256, 16384), (640, 10, 40, 2, 1024, 16384)])
def test_module_fp32_matches_reference(core, dim, heads, mid, b, n, chunk):
    module = random_module(core, dim, heads, mid)
    module.chunk_size = chunk
    sd = {k: v.float() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, dim, generator=g)
    with torch.no_grad():
        out = module(x)
    ref = reference_module_forward(sd, x, x, x, heads)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_module_takes_keys_from_context_and_values_from_value(core):
    """attn1_patch passes context and value explicitly (HyperTile, reference-only nodes...)."""
    module = random_module(core, 64, 4, None)
    g = torch.Generator().manual_seed(2)
    x, ctx, val = (torch.randn(2, 40, 64, generator=g) for _ in range(3))
    with torch.no_grad():
        out = module(x, context=ctx, value=val)
        plain = module(x)
    ref = reference_module_forward(module.state_dict(), x, ctx, val, 4)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - plain).abs().max().item() > 1e-3


def test_module_state_merges_over_tiles(core):
    module = random_module(core, 64, 4, None)
    x = torch.randn(1, 900, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state = module.compute_state(x[:, :400]) + module.compute_state(x[:, 400:])
        tiles = torch.cat([module.attend(x[:, :400], state), module.attend(x[:, 400:], state)], dim=1)
        whole = module(x)
    assert (tiles - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_module_half_precision(core, dtype, tol):
    """Weights and activations in half precision (comfy.ops casting), state in fp32: stated tolerance is
    relative to the output scale, covering half-precision projections (the attention itself adds ~1e-3)."""
    module = random_module(core, 320, 8, None)
    ref_sd = module.state_dict()
    half = module.to(dtype)
    x = torch.randn(2, 1024, 320, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = half(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = reference_module_forward(ref_sd, x, x, x, 8)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tol


def test_bad_heads(core):
    with pytest.raises(ValueError, match="heads"):
        core.attention.module.LinFusionAttention(320, 7)


def test_queries_folded_into_batch_attend_to_their_images_state(core):
    """HyperTile's layout: queries (b tiles) x n/t x C, keys/values b x n x C."""
    module = random_module(core, 64, 4, None)
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(5))
    tiles = x.reshape(2, 4, 16, 64).reshape(8, 16, 64)
    with torch.no_grad():
        whole = module(x)
        tiled = module(tiles, context=x, value=x).reshape(2, 64, 64)
    assert (tiled - whole).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="cannot be grouped"):
        module(x[:1, :5].repeat(3, 1, 1), context=x, value=x)   # 3 query rows, 2 images


@pytest.mark.parametrize("mid", [None, -1])
def test_in_place_shortcuts_leave_inputs_and_gradients_intact(core, mid):
    """The fast path overwrites its own fresh projections: the caller's tensor must stay as it was, and with
    autograd on (training, guidance through the model) it falls back to out-of-place and gradients are exact."""
    module = random_module(core, 64, 4, mid)
    module.chunk_size = 7
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(6))
    x_before = x.clone()
    with torch.inference_mode():
        module(x)
    assert torch.equal(x, x_before)
    x.requires_grad_()
    module(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    reference_module_forward(sd, x, x, x, 4).square().sum().backward()
    assert torch.equal(x.detach(), x_before)
    assert (grad - x.grad).abs().max().item() <= 1e-5 * max(1.0, x.grad.abs().max().item())


def test_chunk_size_from_transformer_options_reaches_the_module(core):
    """Low-memory mode's attention_chunk_tokens travels in transformer_options to every injected attn1:
    the module then works in chunks of that many tokens, with the same result."""
    import importlib

    patch = importlib.import_module(core.__name__ + ".patching.patch")
    module = random_module(core, 64, 4, None, seed=3)
    x = torch.randn(2, 50, 64)
    seen = []
    attend = module.attend

    def spy(x_, state, chunk_size=None):
        seen.append(chunk_size)
        return attend(x_, state, chunk_size)

    module.attend = spy
    forward = patch.LinFusionForward(module, 0, previous=None)
    with torch.inference_mode():
        default = forward(x, transformer_options={})
        chunked = forward(x, transformer_options={patch.LINEAR_ATTENTION_CHUNK_KEY: 7})
    # Without a chunk size the whole batch takes the one-pass fast path (attend is the chunked reference path's);
    # with one, the module works in chunks of that many tokens.
    assert seen == [7]
    assert torch.allclose(chunked, default, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("b,n,chunk,calls", [(2, 256, 16384, [(2, 256)]), (5, 64, 128, [(2, 64), (2, 64), (1, 64)]),
                                             (2, 300, 128, [(1, 128), (1, 128), (1, 44)] * 2)])
def test_projections_run_on_whole_batches_while_they_fit_a_chunk(core, b, n, chunk, calls):
    """The reference path: images are grouped into one Linear call while b * n fits a chunk (no per-image loop at
    small N); an image larger than a chunk is cut along its tokens, so no block exceeds the chunk."""
    module = random_module(core, 64, 4, 32)
    module.chunk_size = chunk
    module.fast_path = False   # the fast path never calls the layers (tests/test_attention_fast.py)
    seen = {name: [] for name in ("to_q", "to_k", "to_v", "to_out")}
    for name in seen:
        layer = module.to_out[0] if name == "to_out" else getattr(module, name)
        layer.register_forward_hook(lambda m, args, out, name=name: seen[name].append(tuple(args[0].shape[:2])))
    with torch.inference_mode():
        module(torch.randn(b, n, 64))
    assert seen == dict.fromkeys(seen, calls)

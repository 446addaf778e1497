"""The fast LinFusion attention against the plain formula: sizes, dtypes, chunking, state merging, memory."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op creates: proves no N x N (or full fp32 copy) appears."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and func is not torch.ops.aten.view.default:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def qkv(b, n, c, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, n, c, generator=g) * scale).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("b,n,c,heads,chunk", [(2, 77, 320, 8, 16), (1, 4096, 64, 1, 1000), (3, 300, 640, 10, 4096),
                                              (2, 1024, 1280, 20, 256), (2, 256, 1280, 20, 16384),
                                              (3, 100, 64, 2, 200), (3, 100, 64, 2, 100), (3, 101, 64, 2, 100)])
def test_fp32_matches_reference(core, b, n, c, heads, chunk):
    att = core.attention.reference
    q, k, v = qkv(b, n, c)
    ref = att.linear_attention_reference(q, k, v, heads)
    out = att.linear_attention(q, k, v, heads, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (b, n, c)
    assert (out - ref).abs().max().item() <= 1e-5


def test_reference_is_the_paper_formula_per_head(core):
    # An independent, loop-over-heads spelling of LinFusion's formula (FACTS section 2).
    q, k, v = qkv(1, 50, 12)
    heads, d = 3, 4
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[0, :, h * d:(h + 1) * d].double() for t in (q, k, v))
        qh, kh = F.elu(qh) + 1, F.elu(kh) + 1
        s = kh.T @ vh / 50
        z = qh @ kh.mean(0) + 1e-4
        outs.append((qh @ s) / z[:, None])
    expected = torch.cat(outs, dim=1)[None].float()
    assert (core.attention.reference.linear_attention_reference(q, k, v, heads) - expected).abs().max().item() <= 1e-6


def official_spelling(q, k, v, heads):
    """LinFusion as the official GeneralizedLinearAttention.forward computes it (our own transcription):
    K^T V scaled by the QUERY count (split N^-0.5 on K and V), mean(K) over the keys."""
    b, n_q, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (k.transpose(-2, -1) * n_q ** -0.5) @ (v * n_q ** -0.5)
    return (q @ kv / z).transpose(1, 2).reshape(b, n_q, c).float()


def test_reference_and_the_official_code_agree_on_self_attention_and_part_on_query_tiles(core):
    """Where the reference's docstring says it differs from the official code, and why that is the right
    choice: identical for self-attention (the only place LinFusion runs); for a tile of the queries against
    all keys (HyperTile, tiled UNet) ours gives the untiled rows, the query-count scaling 4x them."""
    ref = core.attention.reference.linear_attention_reference
    q, k, v = qkv(2, 64, 40, seed=3)
    assert (official_spelling(q, k, v, 5) - ref(q, k, v, 5)).abs().max().item() <= 1e-5
    tile = q[:, :16]
    untiled_rows = ref(q, k, v, 5)[:, :16]
    torch.testing.assert_close(ref(tile, k, v, 5), untiled_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(official_spelling(tile, k, v, 5), 4 * untiled_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_within_rounding_of_fp32(core, dtype, tol):
    """Stated tolerance: the half-precision result is the fp32 result of the same (rounded) inputs up to
    output rounding (fp16 ~ 1e-3 relative, bf16 ~ 8e-3 relative)."""
    att = core.attention.reference
    q, k, v = qkv(2, 2000, 320, dtype)
    ref = att.linear_attention_reference(q, k, v, 8)
    out = att.linear_attention(q, k, v, 8, chunk_size=512)
    assert out.dtype == dtype
    assert ((out.float() - ref).abs() / (ref.abs() + 1)).max().item() <= tol


def test_fp16_state_does_not_overflow(core):
    # Keys/values large enough that sum K^T V overflows fp16 (65504) many times over: fp32 state keeps it finite.
    att = core.attention.reference
    q, k, v = qkv(1, 65536, 64, torch.float16, scale=30.0)
    out = att.linear_attention(q, k, v, 2, chunk_size=8192)
    assert torch.isfinite(out).all()
    ref = att.linear_attention_reference(q, k, v, 2)
    assert ((out.float() - ref).abs() / (ref.abs() + 1)).max().item() <= 2e-3


def test_state_is_additive_over_tiles(core):
    att = core.attention.reference
    q, k, v = qkv(2, 1000, 64)
    parts = [(0, 123), (123, 640), (640, 1000)]
    state = None
    for a, b in parts:
        s = att.linear_attention_state(k[:, a:b], v[:, a:b], heads=4, chunk_size=100)
        state = s if state is None else state + s
    assert state.count == 1000 and state.kv_sum.dtype == torch.float32
    # Each tile's queries attend to the merged global state: exactly the whole-canvas result.
    out = torch.cat([att.apply_linear_attention_state(q[:, a:b], state, heads=4) for a, b in parts], dim=1)
    ref = att.linear_attention_reference(q, k, v, 4)
    assert (out - ref).abs().max().item() <= 1e-5


def test_cross_length_keys(core):
    # attn1_patch users may pass a context of another length (e.g. reference tokens appended).
    att = core.attention.reference
    q, _, _ = qkv(2, 100, 64, seed=1)
    _, k, v = qkv(2, 333, 64, seed=2)
    ref = att.linear_attention_reference(q, k, v, 4)
    assert (att.linear_attention(q, k, v, 4, chunk_size=50) - ref).abs().max().item() <= 1e-5


def test_262144_tokens_without_quadratic_memory(core):
    """N = 262144 (a 4096 px SD1.5 canvas at the top level): the largest tensor created while computing
    is bounded by the output, and in half precision no full fp32 copy of q/k/v appears."""
    att = core.attention.reference
    n, c, heads, chunk = 262144, 64, 2, 16384
    q, k, v = qkv(1, n, c, torch.float16, seed=3)
    with LargestTensor() as tracker:
        out = att.linear_attention(q, k, v, heads, chunk_size=chunk)
    output_bytes = n * c * 2
    assert tracker.largest <= output_bytes, tracker.largest
    assert tracker.largest < n * c * 4                    # never a full fp32 copy of q, k or v
    assert tracker.largest < n * n                        # and, trivially then, nothing N x N
    ref = att.linear_attention_reference(q, k, v, heads)
    assert ((out.float() - ref).abs() / (ref.abs() + 1)).max().item() <= 2e-3


@pytest.mark.parametrize("bad", ["rank", "heads", "batch", "tokens"])
def test_bad_shapes_raise_clear_errors(core, bad):
    att = core.attention.reference
    q, k, v = qkv(2, 10, 64)
    with pytest.raises(ValueError):
        if bad == "rank":
            att.linear_attention(q[0], k[0], v[0], 4)
        elif bad == "heads":
            att.linear_attention(q, k, v, 5)
        elif bad == "batch":
            att.linear_attention(q, k[:1], v[:1], 4)
        else:
            att.linear_attention(q, k, v[:, :5], 4)


def test_token_blocks_cover_every_token_once_within_the_chunk(core):
    blocks = core.attention.reference.token_blocks
    assert blocks(2, 256, 16384) == [(0, 2, 0, 256)]                          # the whole batch at once
    assert blocks(5, 64, 128) == [(0, 2, 0, 64), (2, 4, 0, 64), (4, 5, 0, 64)]
    assert blocks(2, 300, 128) == [(0, 1, 0, 128), (0, 1, 128, 256), (0, 1, 256, 300),
                                   (1, 2, 0, 128), (1, 2, 128, 256), (1, 2, 256, 300)]
    for b, n, chunk in [(1, 1, 1), (3, 7, 5), (4, 16384, 16384), (2, 16385, 16384), (7, 3, 20)]:
        covered = torch.zeros(b, n, dtype=torch.int64)
        for i0, i1, t0, t1 in blocks(b, n, chunk):
            assert (i1 - i0) * (t1 - t0) <= chunk
            covered[i0:i1, t0:t1] += 1
        assert covered.eq(1).all()


def test_phi_is_elu_plus_one(core):
    """The CPU spelling exp(min(u, 0)) + max(u, 0) is elu(u) + 1 up to one rounding, in place, for every sign."""
    u = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, -200.0, 80.0])])
    exact = torch.where(u > 0, u.double() + 1, u.double().exp())      # elu(u) + 1 without double's cancellation
    t = u.clone()
    out = core.attention.reference.phi_(t)
    assert out.data_ptr() == t.data_ptr()
    torch.testing.assert_close(out.double(), exact, rtol=2e-7, atol=2.0 ** -126)   # fp32 underflows below
    assert (out - (F.elu(u) + 1)).abs().max().item() <= 2 ** -23      # today's fp32 spelling: one rounding at 1
    assert core.attention.reference.phi_(torch.tensor([float("nan")])).isnan().all()

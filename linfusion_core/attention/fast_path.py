"""LinFusion's self-attention module in the fewest launches: weights folded and packed once, one pass.

The reference path (module.py over attention/reference.py's block loop) projects with the module's own layers and works
image block by image block; it stays for what needs it: tiles and HyperTile (keys other than the queries),
Low-Memory Mode's token chunks, autograd, and layers that ComfyUI casts per call. This file is the path a
plain self-attention call takes, the same function in fewer, bigger ops (fla's habit: naive.py beside each
kernel). With x the B x N x C tokens, m the MLP width, h heads of d channels:

    a      = LeakyReLU(LayerNorm(x W1 + b1))                   both MLPs' hidden layers: one GEMM, one norm
    q, k   = x Wqk + b_qk  +  a Wa                             to_q(x + to_q_(x)) with to_q_'s last Linear
                                                               folded into to_q (to_q has no bias), so no
                                                               residual add and no second projection
    V      = [v | 1 | 0] N^-1/2                                to_v with extra outputs per head: one of zero
                                                               weights and bias 1, then zeros up to w (GEMM
                                                               alignment: head_width), scaled in the GEMM
    S      = phi(K)^T V             per (image, head): d x w = [K^T V | sum K | 0] N^-1/2, one batched GEMM
    num    = eps_row + N^-1/2 phi(Q) S                         [Q K^T V / N | Q mean(K) + 1e-4], one GEMM
    out    = to_out(num[:d] / num[d])                          the divide writes B x N x C for to_out

The tokens are put in (token, image) order first (one copy of x when B > 1), so every (image, head) block
of q, k and V is a strided view with one batch stride: the per-head GEMMs batch over images and heads with no
head-major copies. Reductions: the state is accumulated in fp32 (fp32 inputs; on CUDA, fp16/bf16 inputs
with `out_dtype=float32`; on a CPU, half inputs are upcast for that one GEMM); everything else runs in the
input dtype with the GEMMs' own fp32 accumulation. The split N^-1/2 keeps the half copy of S in range.

Weights: packed from the module's layers once per (device, dtype) and cached on the module, rebuilt when a
layer's tensor is replaced, moved, cast, or (outside torch.compile, and for tensors made outside
torch.inference_mode, which alone have version counters) changed in place. Only for layers that
hold plain weights on the input's device and dtype: a layer ComfyUI casts per call (low-VRAM partial
loading, fp8 or manual-cast storage, 0.33's DynamicVRAM, LoRA weight functions) takes the reference path, so
what ComfyUI does to those weights is applied as before. The cache costs device memory next to the layers
(the packed q/k/v and MLP weights: 3/4 of the module's size for LinFusion-XL, 7/8 for LinFusion-1-5),
dropped when the module is moved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import DEFAULT_CHUNK_SIZE, EPS, is_compiling

# The fast path runs the whole batch in one pass while a C-wide temporary holds at most this many values (two
# of the reference path's chunks at 1280 channels: cond + uncond of a 16K-token level at C <= 1280 in one
# pass). Larger calls, or any call given an explicit chunk size (Low-Memory Mode), take the chunked path.
FAST_MAX_ELEMENTS = 2 * DEFAULT_CHUNK_SIZE * 1280
# A CUDA GEMM of fp16/bf16 inputs with an fp32 result (torch >= 2.8); elsewhere half inputs are upcast.
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


@dataclass(eq=False)
class PackedWeights:
    """The module's weights folded for the fast path, in one device and dtype (see the module docstring)."""
    sources: tuple                 # the layer tensors these were made from (identity checks)
    stamps: tuple                  # their data pointers and version counters when packed (_stamps)
    device: torch.device
    dtype: torch.dtype
    heads: int
    # Index 0 is the q side, 1 the k side; batched GEMM weights are stored (input x output).
    w1: torch.Tensor | None        # 2m x C: [to_q_.0; to_k_.0]       (None: projection_mid_dim -1, no MLP)
    b1: torch.Tensor | None        # 2m
    ln_one: torch.Tensor | None    # m: ones, zeros (the LayerNorms' own affines differ per side: ln_w, ln_b)
    ln_zero: torch.Tensor | None
    ln_w: torch.Tensor | None      # 2 x m
    ln_b: torch.Tensor | None      # 2 x m
    ln_eps: float
    w_qk: torch.Tensor             # 2 x C x C: to_q, to_k (doubled without MLP: x + Identity(x) = 2x)
    b_qk: torch.Tensor | None      # 2 x 1 x C: to_q(to_q_.3.bias), to_k(to_k_.3.bias)
    w_a: torch.Tensor | None       # 2 x m x C: (to_q . to_q_.3)^T, (to_k . to_k_.3)^T
    w_v: torch.Tensor              # hw x C: to_v, each head's d rows followed by w - d zero rows
    b_v: torch.Tensor              # hw: 1 at the first of those rows, 0 elsewhere
    w_o: torch.Tensor              # to_out.0's own tensors
    b_o: torch.Tensor | None
    eps_row: torch.Tensor          # w: 1e-4 at index d, 0 elsewhere


def head_width(d: int, heads: int, device: torch.device) -> int:
    """Columns per head of [v | 1] and of the state: d + 1, padded so that GEMM rows stay aligned. On CUDA to a
    multiple of 8 (16-byte strides for the per-head GEMMs' tensor cores); elsewhere only as far as a whole row of
    V (heads x width) needs to be a multiple of 8 (a 650-wide GEMM was 1.5x slower on the CPU than 656)."""
    if device.type == "cuda":
        return -(-(d + 1) // 8) * 8
    w = d + 1
    while (heads * w) % 8:
        w += 1
    return w


def _layers(module):
    mlp = module.projection_mid_dim != -1
    named = [("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v), ("to_out", module.to_out[0])]
    if mlp:
        named += [(f"{b}.{i}", getattr(module, b)[i]) for b in ("to_q_", "to_k_") for i in (0, 1, 3)]
    return named


def _plain(layer, device, dtype) -> bool:
    """A layer whose forward would use its stored tensors as they are: no per-call cast or weight function
    (comfy.ops), and weights already on `device` in `dtype` as plain tensors."""
    if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None) \
            or getattr(layer, "bias_function", None):
        return False
    for t in (layer.weight, layer.bias):
        if t is not None and (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device != device
                              or t.dtype != dtype):
            return False
    return True


def _stamps(sources) -> tuple:
    """Where each tensor's data is and, where torch tracks it, how often it was changed in place. Tensors made
    under torch.inference_mode (ComfyUI runs its nodes there, so Apply LinFusion's layers are such tensors)
    have no version counter: for them an in-place change is not seen, a new or moved tensor is."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in sources)


@torch.no_grad()
def pack(module, device: torch.device, dtype: torch.dtype) -> PackedWeights:
    """Fold and pack the module's weights: fp64 math on CUDA (TF32 cannot round the folds there), fp32 elsewhere
    (MPS has no fp64)."""
    layers = dict(_layers(module))
    sources = tuple(t for _, layer in _layers(module) for t in (layer.weight, layer.bias) if t is not None)
    work = torch.float64 if device.type == "cuda" else torch.float32
    f = lambda t: t.detach().to(device=device, dtype=work)  # noqa: E731
    out = lambda t: t.to(dtype).contiguous()                 # noqa: E731
    c, heads = module.dim, module.heads
    d = c // heads
    wq, wk, wv = f(layers["to_q"].weight), f(layers["to_k"].weight), f(layers["to_v"].weight)
    w = head_width(d, heads, device)
    w_v = torch.zeros(heads, w, c, dtype=work, device=device)
    w_v[:, :d] = wv.view(heads, d, c)
    b_v = torch.zeros(heads, w, dtype=work, device=device)
    b_v[:, d] = 1.0
    eps_row = torch.zeros(w, dtype=work, device=device)
    eps_row[d] = EPS
    mlp = {}
    if module.projection_mid_dim == -1:
        # x + Identity(x) = 2x: to_q(2x) = (2 W_q) x exactly (a power of two).
        w_qk = torch.stack([2 * wq, 2 * wk]).transpose(1, 2)                 # 2 x C(in) x C(out)
        b_qk = None
    else:
        w1 = torch.cat([f(layers["to_q_.0"].weight), f(layers["to_k_.0"].weight)])
        b1 = torch.cat([f(layers["to_q_.0"].bias), f(layers["to_k_.0"].bias)])
        m = w1.shape[0] // 2
        ln_q, ln_k = layers["to_q_.1"], layers["to_k_.1"]
        if ln_q.eps != ln_k.eps:
            raise ValueError("LinFusion: the q and k MLPs' LayerNorms have different eps")
        w2q, w2k = f(layers["to_q_.3"].weight), f(layers["to_k_.3"].weight)
        mlp = dict(w1=out(w1), b1=out(b1),
                   ln_one=torch.ones(m, dtype=dtype, device=device), ln_zero=torch.zeros(m, dtype=dtype, device=device),
                   ln_w=out(torch.stack([f(ln_q.weight), f(ln_k.weight)])),
                   ln_b=out(torch.stack([f(ln_q.bias), f(ln_k.bias)])), ln_eps=float(ln_q.eps),
                   w_a=out(torch.stack([(wq @ w2q).T, (wk @ w2k).T])))
        w_qk = torch.stack([wq, wk]).transpose(1, 2)
        b_qk = out(torch.stack([wq @ f(layers["to_q_.3"].bias), wk @ f(layers["to_k_.3"].bias)]).view(2, 1, c))
    to_out = layers["to_out"]
    return PackedWeights(
        sources=sources, stamps=_stamps(sources), device=device, dtype=dtype, heads=heads,
        w1=mlp.get("w1"), b1=mlp.get("b1"), ln_one=mlp.get("ln_one"), ln_zero=mlp.get("ln_zero"),
        ln_w=mlp.get("ln_w"), ln_b=mlp.get("ln_b"), ln_eps=mlp.get("ln_eps", 0.0),
        w_qk=out(w_qk), b_qk=b_qk, w_a=mlp.get("w_a"), w_v=out(w_v.view(heads * w, c)),
        b_v=out(b_v.view(-1)), w_o=to_out.weight.detach(),
        b_o=to_out.bias.detach() if to_out.bias is not None else None, eps_row=out(eps_row))


def packed_weights(module, device: torch.device, dtype: torch.dtype) -> PackedWeights | None:
    """The module's packed weights for this device and dtype (cached on the module), or None when a layer is not
    plain (the caller then takes the reference path, and a stale cache is dropped)."""
    layers = _layers(module)
    if not all(_plain(layer, device, dtype) for _, layer in layers):
        module._linfusion_packed = None
        return None
    cached = module._linfusion_packed
    if cached is not None and cached.device == device and cached.dtype == dtype:
        sources = tuple(t for _, layer in layers for t in (layer.weight, layer.bias) if t is not None)
        same = len(sources) == len(cached.sources) and all(a is b for a, b in zip(sources, cached.sources))
        if same and is_compiling():
            # Dynamo guards on the tensors' identity, device and dtype; version counters cannot be traced, so
            # an in-place change of a weight between compiled calls is seen at the next eager call.
            return cached
        if same and _stamps(sources) == cached.stamps:
            return cached
    cached = pack(module, device, dtype)
    module._linfusion_packed = cached
    return cached


def prepare(module) -> bool:
    """Pack now, outside any compiled region, for the device and dtype the module's weights are in (the input's,
    wherever the fast path can run): a torch.compile'd model then finds the cache instead of tracing the
    packing into its first graph and recompiling once it is stored. False where the layers are not plain."""
    weight = module.to_out[0].weight
    return packed_weights(module, weight.device, weight.dtype) is not None


def fast_path_fits(x: torch.Tensor, chunk_size: int | None) -> bool:
    """Whether one pass over the whole batch is allowed: within an explicit chunk size (Low-Memory Mode), or
    within FAST_MAX_ELEMENTS per C-wide temporary."""
    rows = x.shape[0] * x.shape[1]
    if chunk_size:
        return rows <= chunk_size
    return rows * x.shape[2] <= FAST_MAX_ELEMENTS


def _phi_(t: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1 in place (as attention.phi_: on a CPU exp(min(t, 0)) + max(t, 0), torch's CPU elu
    being a scalar expm1; the compiler fuses either)."""
    if t.device.type != "cpu":
        return F.elu_(t).add_(1.0)
    low = t.clamp_max(0.0).exp_()
    return t.clamp_min_(0.0).add_(low)


def fast_forward(p: PackedWeights, x: torch.Tensor) -> torch.Tensor:
    """The module's self-attention output for x (B x N x C), no autograd, from packed weights."""
    b, n, c = x.shape
    heads = p.heads
    d = c // heads
    rows = b * n
    scale = n ** -0.5
    # (token, image) order: row t*B + i is token t of image i. A copy only when B > 1. Temporaries are let go
    # as soon as they are used (`del`): a lower peak lets the CPU allocator reuse memory instead of mapping
    # fresh pages.
    xn = x.transpose(0, 1).reshape(rows, c)
    w = p.eps_row.shape[0]
    v = torch.addmm(p.b_v, xn, p.w_v.t(), beta=scale, alpha=scale)                    # rows x hw
    if p.w1 is None:
        qk = torch.bmm(xn.expand(2, rows, c), p.w_qk)                                  # 2 x rows x C
    else:
        m = p.w1.shape[0] // 2
        h = torch.addmm(p.b1, xn, p.w1.t()).view(rows, 2, m)                          # rows x (q, k) x m
        # LayerNorm per side with its own affine: the norm with a unit affine (torch's CPU kernel is several
        # times slower without one), then both sides' scale and shift in one op.
        a = torch.addcmul(p.ln_b, F.layer_norm(h, (m,), p.ln_one, p.ln_zero, p.ln_eps), p.ln_w)
        del h
        a = F.leaky_relu_(a, 0.01)
        # q and k from the same tokens (x expanded, no copy), then the folded MLP outputs added in place.
        qk = torch.baddbmm(p.b_qk, xn.expand(2, rows, c), p.w_qk).baddbmm_(a.transpose(0, 1), p.w_a)
        del a
    del xn
    qk = _phi_(qk)
    # Per (image, head) views, batch index i*h + j, one batch stride each.
    k_t = qk[1].view(n, b * heads, d).permute(1, 2, 0)                                 # Bh x d x N
    v_h = v.view(n, b * heads, w).transpose(0, 1)                                      # Bh x N x w
    if x.dtype == torch.float32:
        s = torch.bmm(k_t, v_h)
    elif x.device.type == "cuda" and _BMM_OUT_DTYPE:
        s = torch.bmm(k_t, v_h, out_dtype=torch.float32).to(x.dtype)
    else:
        s = torch.bmm(k_t.float(), v_h.float()).to(x.dtype)
    del k_t, v_h, v
    q_h = qk[0].view(n, b * heads, d).transpose(0, 1)                                  # Bh x N x d
    num = torch.baddbmm(p.eps_row, q_h, s, alpha=scale).view(b, heads, n, w)
    del q_h, qk
    if is_compiling():
        out = (num[..., :d] / num[..., d:d + 1]).transpose(1, 2).reshape(rows, c)      # fused by the compiler
    else:
        out = x.new_empty(b, n, heads, d)
        # Divide, merge heads and write in token order in one pass (out= on a strided view: eager only).
        torch.div(num[..., :d], num[..., d:d + 1], out=out.transpose(1, 2))
        out = out.view(rows, c)
    del num
    if p.b_o is None:
        return torch.mm(out, p.w_o.t()).view(b, n, c)
    return torch.addmm(p.b_o, out, p.w_o.t()).view(b, n, c)

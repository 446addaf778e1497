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
torch.inference_mode, which alone have version counters) changed in place. A layer ComfyUI casts per call
(comfy.ops with comfy_cast_weights: 0.33's DynamicVRAM, which is its default on NVIDIA, low-VRAM partial loading,
fp8 or manual-cast storage; or with LoRA weight functions) is asked for its weights the way its own forward asks
(comfy.ops.cast_bias_weight, given back with uncast_bias_weight), so what ComfyUI does to them applies as before.
Where the cast hands back the same tensors call after call (DynamicVRAM's resident weights, a cast that needs
no copy) the packed weights are cached as for plain layers. Where it hands back new ones at STREAMED_AFTER calls
in a row (weights streamed in per call, a per-call weight function or dtype cast), folding per call would cost
more than it saves: the module runs the reference path until the next sampler run (`prepare`). Under
torch.compile cast layers always take the reference path (the cast is host code). The cache costs device memory
next to the layers (the packed q/k/v and MLP weights: 3/4 of the module's size for LinFusion-XL, 7/8 for
LinFusion-1-5), dropped when the module is moved and after each sampler run.
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
# Calls in a row at which a module's cast layers handed back new tensors before it counts as streamed.
STREAMED_AFTER = 3


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


def _casts(layer) -> bool:
    """Whether the layer's forward asks ComfyUI for its weights (comfy.ops: per-call cast or weight functions)."""
    return bool(getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


def _usable(t, device, dtype) -> bool:
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == device and t.dtype == dtype)


def _plain(layer, device, dtype) -> bool:
    """A layer whose forward would use its stored tensors as they are: no per-call cast or weight function
    (comfy.ops), and weights already on `device` in `dtype` as plain tensors."""
    return not _casts(layer) and _usable(layer.weight, device, dtype) and _usable(layer.bias, device, dtype)


def _stamps(sources) -> tuple:
    """Where each tensor's data is and, where torch tracks it, how often it was changed in place. Tensors made
    under torch.inference_mode (ComfyUI runs its nodes there, so Apply LinFusion's layers are such tensors)
    have no version counter: for them an in-place change is not seen, a new or moved tensor is."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in sources)


@torch.no_grad()
def pack(module, device: torch.device, dtype: torch.dtype, tensors: dict | None = None) -> PackedWeights:
    """Fold and pack the module's weights (or `tensors`: layer name -> (weight, bias), as ComfyUI cast them):
    fp64 math on CUDA (TF32 cannot round the folds there), fp32 elsewhere (MPS has no fp64)."""
    tensors = tensors or _own_tensors(module)
    layers = {name: _Layer(*tensors[name], getattr(layer, "eps", None)) for name, layer in _layers(module)}
    sources = _sources(module, tensors)
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


@dataclass
class _Layer:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float | None


def _own_tensors(module) -> dict:
    return {name: (layer.weight, layer.bias) for name, layer in _layers(module)}


def _sources(module, tensors: dict) -> tuple:
    return tuple(t for name, _ in _layers(module) for t in tensors[name] if t is not None)


def _cached(module, tensors: dict, device, dtype) -> PackedWeights | None:
    """The cached packed weights if they were made from exactly these tensors, unchanged since."""
    cached = module._linfusion_packed
    if cached is None or cached.device != device or cached.dtype != dtype:
        return None
    sources = _sources(module, tensors)
    if len(sources) != len(cached.sources) or not all(a is b for a, b in zip(sources, cached.sources)):
        return None
    # Under torch.compile Dynamo guards on the tensors' identity, device and dtype; version counters cannot be
    # traced, so an in-place change of a weight between compiled calls is seen at the next eager call.
    return cached if is_compiling() or _stamps(sources) == cached.stamps else None


def packed_weights(module, device: torch.device, dtype: torch.dtype) -> PackedWeights | None:
    """The module's packed weights for this device and dtype (cached on the module), or None when a layer is not
    plain (see `forward` for cast layers; a stale cache is dropped)."""
    if not all(_plain(layer, device, dtype) for _, layer in _layers(module)):
        module._linfusion_packed = None
        return None
    cached = _cached(module, _own_tensors(module), device, dtype)
    if cached is None:
        cached = module._linfusion_packed = pack(module, device, dtype)
    return cached


def _cast_packed(module, x: torch.Tensor, casts: list) -> PackedWeights | None:
    """Packed weights from the layers' weights as ComfyUI casts them for x (each cast appended to `casts`, for
    the caller to give back), or None where the reference path must run."""
    import comfy.ops

    tensors = {}
    for name, layer in _layers(module):
        if _plain(layer, x.device, x.dtype):
            tensors[name] = (layer.weight, layer.bias)
            continue
        weight, bias, handle = comfy.ops.cast_bias_weight(layer, x, offloadable=True)
        casts.append((layer, weight, bias, handle))
        if not (_usable(weight, x.device, x.dtype) and _usable(bias, x.device, x.dtype)):
            return None
        tensors[name] = (weight, bias)
    cached = _cached(module, tensors, x.device, x.dtype)
    if cached is not None:
        module._linfusion_misses = 0
        return cached
    module._linfusion_misses = getattr(module, "_linfusion_misses", 0) + 1
    if module._linfusion_misses >= STREAMED_AFTER:
        module._linfusion_streamed = True          # this call still runs fast, from the weights it already has
    module._linfusion_packed = pack(module, x.device, x.dtype, tensors)
    return module._linfusion_packed


def forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """The module's output for a plain self-attention call (B x N x C, no autograd) on the fast path, or None
    where the reference path must run: a layer that is neither plain nor a comfy.ops layer, cast layers under
    torch.compile, a module found streamed in this sampler run (see the module docstring)."""
    layers = _layers(module)
    if all(_plain(layer, x.device, x.dtype) for _, layer in layers):
        return fast_forward(packed_weights(module, x.device, x.dtype), x)
    if getattr(module, "_linfusion_streamed", False) or is_compiling() \
            or not all(hasattr(layer, "comfy_cast_weights") for _, layer in layers if _casts(layer)) \
            or not all(_casts(layer) or _plain(layer, x.device, x.dtype) for _, layer in layers):
        module._linfusion_packed = None
        return None
    import comfy.ops

    casts = []
    try:
        packed = _cast_packed(module, x, casts)
        if packed is None:
            module._linfusion_packed = None
            module._linfusion_streamed = True
            return None
        return fast_forward(packed, x)
    finally:
        for layer, weight, bias, handle in casts:
            comfy.ops.uncast_bias_weight(layer, weight, bias, handle)


def prepare(module) -> bool:
    """At the start of a sampler run (ON_PRE_RUN): a new run re-tests whether cast layers stream, and plain
    layers are packed now, outside any compiled region, for the device and dtype their weights are in (the
    input's, wherever the fast path can run): a torch.compile'd model then finds the cache instead of tracing
    the packing into its first graph and recompiling once it is stored. False where the layers are not plain."""
    module._linfusion_streamed = False
    module._linfusion_misses = 0
    weight = module.to_out[0].weight
    if weight is None:                             # DynamicVRAM before its first load: nothing to pack yet
        return False
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

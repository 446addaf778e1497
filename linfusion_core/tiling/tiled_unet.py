"""Run a ComfyUI UNetModel (SD1.x / SD2.x / SDXL family) spatially tile by tile, equal to the untiled forward.

Every block's full-size activation lives on a "park" device (CPU memory or the accelerator); each layer
reads tiles of it (with the halo a convolution needs, zero-filled outside the map exactly where the
convolution would zero-pad), computes on the compute device and writes the tile's core back. Where a layer
needs a global reduction, a first pass over all tiles accumulates it:
- GroupNorm: per-group count / mean / M2, merged exactly (group_norm_stats.py);
- LinFusion self-attention: the additive state (sum K^T V, sum K, N) (attention/reference.py, module.py).
Cross-attention, feed-forward, LayerNorm, linear and 1x1 layers are per token and tile freely. Anything
that cannot be tiled exactly (softmax self-attention, attn1 patches, unknown layers, block patches, layers a
forward_timestep_embed_patch handler claims) runs untiled on the full activation: still exact, only not
memory-bounded. A patch key the runner does not know sends the whole call to the untiled UNet
(`unhandled_patches`, checked by tiled_unet_patch.py).
"""
from __future__ import annotations

import functools
import inspect
import logging
import math

import torch

import comfy.ops
from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (Downsample, ResBlock, UNetModel, Upsample,
                                                             forward_timestep_embed, timestep_embedding)

from .. import progress
from ..attention.reference import LinearAttentionState
from .group_norm_stats import group_norm_with_stats, group_part, merge_parts, stats_mean_rstd
from .tiled_unet_distributed import LOCAL

log = logging.getLogger("LinFusion")
_warned: set = set()
MIN_TILE = 4  # smaller tiles cost more in per-call overhead and halos than they save

# The transformer_options["patches"] keys that ComfyUI's UNet (UNetModel._forward, forward_timestep_embed,
# BasicTransformerBlock) reads and that this runner calls where ComfyUI does; the same for patches_replace.
RUNNER_PATCHES = frozenset({
    "emb_patch", "input_block_patch", "input_block_patch_after_skip", "middle_block_after_patch",
    "output_block_patch", "forward_timestep_embed_patch",
    "attn1_patch", "attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch"})
RUNNER_REPLACES = frozenset({"attn1", "attn2"})


@functools.cache
def _host_patches() -> frozenset:
    """RUNNER_PATCHES less those this ComfyUI's UNet never calls (0.3.75 has no middle_block_after_patch): the
    runner must not call them either, so such a key sends the call to the untiled UNet, which ignores it."""
    try:
        source = inspect.getsource(UNetModel._forward)
    except (OSError, TypeError):  # no source to read: assume the hook absent (the fallback is exact either way)
        source = ""
    return RUNNER_PATCHES if '"middle_block_after_patch"' in source else RUNNER_PATCHES - {"middle_block_after_patch"}


def unhandled_patches(transformer_options) -> list[str]:
    """The patch keys (patches_replace kinds as "patches_replace.<kind>") in use that the runner does not
    implement: a patch it does not know could need anything, so the call must run untiled."""
    patches = transformer_options.get("patches", {})
    replaces = transformer_options.get("patches_replace", {})
    return ([k for k, v in patches.items() if v and k not in _host_patches()]
            + [f"patches_replace.{k}" for k, v in replaces.items() if v and k not in RUNNER_REPLACES])


def warn_once(key, message, *args):
    if key not in _warned:
        _warned.add(key)
        log.warning("[LinFusion] " + message, *args)


def tile_ranges(size: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, size)) for s in range(0, size, tile)]


def is_linfusion_attention(module) -> bool:
    """A LinFusion module with the additive-state API (module.LinFusionAttention: compute_state / attend)."""
    return callable(getattr(module, "compute_state", None)) and callable(getattr(module, "attend", None))


def linfusion_for(attn1, n_tokens: int):
    """The LinFusion module that this attn1 runs for a map of n_tokens, or None when softmax runs.

    Apply LinFusion injects an instance-level forward carrying `.linfusion` and the hybrid threshold
    `.min_tokens` (below it the original softmax attn1 runs); a LinFusion module mounted as attn1 itself
    (object patch) is recognised too."""
    forward = attn1.__dict__.get("forward")
    if forward is not None and hasattr(forward, "linfusion"):
        return None if n_tokens < getattr(forward, "min_tokens", 0) else forward.linfusion
    return attn1 if is_linfusion_attention(attn1) else None


def _group_norm(t, mean, rstd, norm):
    """group_norm_with_stats with norm's affine; weights ComfyUI casts per call (manual cast, low VRAM) are
    cast offloadable and uncast after use, as ComfyUI's own layers do (the legacy cast leaves them pinned
    under DynamicVRAM)."""
    if not norm.affine:
        return group_norm_with_stats(t, mean, rstd, norm.num_groups, None, None)
    if not getattr(norm, "comfy_cast_weights", False):
        return group_norm_with_stats(t, mean, rstd, norm.num_groups, norm.weight, norm.bias)
    weight, bias, offload_stream = comfy.ops.cast_bias_weight(norm, t, offloadable=True)
    try:
        return group_norm_with_stats(t, mean, rstd, norm.num_groups, weight, bias)
    finally:
        comfy.ops.uncast_bias_weight(norm, weight, bias, offload_stream)


def _plain_conv(conv) -> bool:
    """True when the conv's forward is torch's own on its stored weights (mirrors comfy.ops' dispatch)."""
    if type(conv).forward is torch.nn.Conv2d.forward:
        return True
    return (isinstance(conv, comfy.ops.CastWeightBiasOp) and not conv.comfy_cast_weights
            and not conv.weight_function and not conv.bias_function)


def _to_tokens(t):
    return t.movedim(1, 3).flatten(1, 2)


def _to_image(tokens, h, w):
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).movedim(3, 1)


class TiledUNetRunner:
    """One tiled forward pass of `unet`. Holds nothing of the model; safe to drop at any time."""

    def __init__(self, unet, tile: int, park_device, compute_device, stale_state_cache: dict | None = None,
                 progress: bool = True, expected_ticks: int | None = None, partition=None):
        self.unet = unet
        # Which tiles this process computes and what it exchanges with others (tiled_unet_distributed.py);
        # LOCAL: all of them, nothing.
        self.part = partition if partition is not None else LOCAL
        if self.part.distributed and stale_state_cache is not None:
            raise ValueError("[LinFusion] the distributed tiled UNet runs the exact mode only (the fast mode's "
                             "stale state is not exchanged between ranks yet)")
        self.tile = int(tile)
        self.park = torch.device(park_device)
        self.dev = torch.device(compute_device)
        self.stale = stale_state_cache  # None: exact two-pass attention; dict: one-step-stale state (fast mode)
        self.progress = progress
        self.expected_ticks = expected_ticks  # tile steps of the last call at this shape, for the bar's total
        self.ticks = 0
        self.pbar = None
        self.untiled_layers = []  # (block, layer class) that ran on the full activation, for tests and logs

    # ---------------------------------------------------------------- tiles
    def _tiles(self, h: int, w: int, channels: int):
        """Tiles of a map at some UNet level, holding about as many values as a `tile` x `tile` tile of the
        UNet's first level: deeper levels (more channels, fewer pixels) get fewer, not tinier, tiles."""
        side = self.tile * math.sqrt(self.unet.model_channels / max(channels, 1))
        t = max(MIN_TILE, math.ceil(side))
        return [(r0, r1, c0, c1) for r0, r1 in tile_ranges(h, t) for c0, c1 in tile_ranges(w, t)]

    def _tick(self):
        self.part.check_interrupt()   # distributed: cancels are taken at the reductions, by every rank together
        self.ticks += 1
        if self.pbar is not None:
            self.part.report(lambda: self.pbar.update_absolute(self.ticks))

    def _window(self, full, r0, r1, c0, c1, pre=None, rows=None, cols=None):
        """Rows [r0, r1) x cols [c0, c1) of pre(full) (optionally nearest-upsampled through index maps),
        on the compute device, zero where the window leaves the map (= the convolution's zero padding)."""
        H = full.shape[2] if rows is None else rows.numel()
        W = full.shape[3] if cols is None else cols.numel()
        a0, a1, b0, b1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
        if rows is None:
            t = full[:, :, a0:a1, b0:b1]
        else:
            ri, ci = rows[a0:a1], cols[b0:b1]
            t = full[:, :, int(ri[0]):int(ri[-1]) + 1, int(ci[0]):int(ci[-1]) + 1]
            t = t.index_select(2, (ri - ri[0]).to(t.device)).index_select(3, (ci - ci[0]).to(t.device))
        t = t.to(self.dev)
        if pre is not None:
            t = pre(t)
        if (a0, a1, b0, b1) != (r0, r1, c0, c1):
            t = torch.nn.functional.pad(t, (b0 - c0, c1 - b1, a0 - r0, r1 - a1))
        return t

    def _empty(self, like, channels, h, w):
        return torch.empty((like.shape[0], channels, h, w), dtype=like.dtype, device=self.park)

    # ---------------------------------------------------------------- tiled primitives
    def group_norm_pre(self, full, norm, act=None, extra=()):
        """Pass 1 over `full`: exact GroupNorm statistics; returns the per-tile pre-op norm(+act, +extra)."""
        tiles = self._tiles(*full.shape[2:], full.shape[1])
        self.part.fetch(full, tiles, lambda r: r[:2])

        def part_of(r):
            p = group_part(full[:, :, r[0]:r[1], r[2]:r[3]].to(self.dev), norm.num_groups)
            self.part.check_interrupt()
            return p
        mean, rstd = stats_mean_rstd(self.part.reduce(tiles, part_of, merge_parts, tuple, self.dev), norm.eps)

        def pre(t):
            t = _group_norm(t, mean, rstd, norm)
            for m in ((act,) if act is not None else ()) + tuple(extra):
                t = m(t)
            return t
        return pre

    def conv(self, full, conv, pre=None, post=None, up_shape=None, reads=()):
        """conv(pre(full)) tile by tile; up_shape: nearest-upsample the input to that size first.

        A plain conv (weights as stored, the usual case) runs as F.conv2d on exactly the window each output
        tile needs, with padding 0. A conv that ComfyUI casts or patches on the fly (low-VRAM LoRA weight
        functions, manual cast, quantized weights) runs through its own forward, so ComfyUI keeps doing
        that: the window then starts m*stride rows early and the outputs it pads for itself are cropped.
        reads: other parked maps of the output's size that `post` reads at each output tile."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return None
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        rows = cols = None
        H, W = full.shape[2:]
        if up_shape is not None:
            # The exact source indices of F.interpolate(mode="nearest"), taken from the function itself.
            idx = lambda n, m: torch.nn.functional.interpolate(  # noqa: E731
                torch.arange(n, dtype=torch.float64).reshape(1, 1, n), size=m, mode="nearest").reshape(m).long()
            H, W = up_shape
            rows, cols = idx(full.shape[2], H), idx(full.shape[3], W)
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        functional = _plain_conv(conv)
        mh, mw = (0, 0) if functional else (-(-ph // sh), -(-pw // sw))
        tiles = self._tiles(Ho, Wo, max(full.shape[1], conv.out_channels))

        def source_rows(r):  # the rows of `full` that output tile r reads
            a0, a1 = max((r[0] - mh) * sh - (ph if functional else 0), 0), min((r[1] - 1) * sh - ph + dh * (kh - 1) + 1, H)
            return (a0, a1) if rows is None else (int(rows[a0]), int(rows[a1 - 1]) + 1)
        self.part.fetch(full, tiles, source_rows)
        for t in reads:
            self.part.fetch(t, tiles, lambda r: r[:2])
        out = self._empty(full, conv.out_channels, Ho, Wo)
        for o0, o1, q0, q1 in self.part.mine(tiles):
            r1 = (o1 - 1) * sh - ph + dh * (kh - 1) + 1
            c1 = (q1 - 1) * sw - pw + dw * (kw - 1) + 1
            def tile(o0=o0, o1=o1, q0=q0, q1=q1, r1=r1, c1=c1):
                if functional:
                    win = self._window(full, o0 * sh - ph, r1, q0 * sw - pw, c1, pre, rows, cols)
                    y = torch.nn.functional.conv2d(win, conv.weight, conv.bias, conv.stride, 0, conv.dilation,
                                                   conv.groups)
                else:
                    win = self._window(full, (o0 - mh) * sh, r1, (q0 - mw) * sw, c1, pre, rows, cols)
                    y = conv(win)[:, :, mh:mh + o1 - o0, mw:mw + q1 - q0]
                return y if post is None else post(y, (o0, o1, q0, q1))
            out[:, :, o0:o1, q0:q1] = self.part.compute(tile).to(self.park)
            self._tick()
        return self.part.produced(out, tiles)

    def pointwise(self, full, fn, channels=None, reads=()):
        """fn(tile, region) per tile of a per-pixel computation giving `channels` (default: full's); reads:
        other parked maps of full's size that fn reads at each tile."""
        tiles = self._tiles(*full.shape[2:], full.shape[1])
        for t in (full,) + tuple(reads):
            self.part.fetch(t, tiles, lambda r: r[:2])
        out = self._empty(full, channels or full.shape[1], *full.shape[2:])
        for r in self.part.mine(tiles):
            r0, r1, c0, c1 = r
            y = self.part.compute(lambda: fn(full[:, :, r0:r1, c0:c1].to(self.dev), r))
            out[:, :, r0:r1, c0:c1] = y.to(self.park)
            self._tick()
        return self.part.produced(out, tiles)

    def untiled(self, layer, full, emb, context, to, output_shape, extra, why=None):
        """Exact fallback: ComfyUI's forward_timestep_embed for the layer (its patch handlers included) on the
        whole activation."""
        name = type(layer).__name__ + (f": {why}" if why else "")
        self.untiled_layers.append((to.get("block"), name))
        warn_once(name, "tiled UNet: %s runs untiled on the full activation (exact, not memory-bounded%s)", name,
                  self._gathered())
        full = self.part.gather(full)
        y = self.part.compute(lambda: forward_timestep_embed([layer], full.to(self.dev), emb, context, to,
                                                             output_shape, **extra))
        self.ticks += len(self._tiles(*full.shape[2:], full.shape[1]))
        return self.part.everywhere(y.to(self.park))

    def _gathered(self) -> str:
        return "; distributed: gathered on every rank, which each computes" if self.part.distributed else ""

    def _whole(self, h):
        """h whole on the compute device (gathered from every rank first when distributed), for a patch."""
        return self.part.gather(h).to(self.dev)

    # ---------------------------------------------------------------- layers
    def resblock(self, blk, x, emb):
        il, ol = blk.in_layers, blk.out_layers
        if (blk.updown or blk.use_scale_shift_norm or blk.exchange_temb_dims or x.ndim != 4
                or len(il) != 3 or len(ol) != 4 or not isinstance(il[0], torch.nn.GroupNorm)
                or not isinstance(ol[0], torch.nn.GroupNorm)
                or (isinstance(blk.skip_connection, torch.nn.Conv2d) and blk.skip_connection.kernel_size != (1, 1))):
            return None  # a variant this executor does not tile: exact untiled fallback
        emb_out = None
        if not getattr(blk, "skip_t_emb", False):
            emb_out = self.part.compute(lambda: blk.emb_layers(emb)).type(x.dtype)[:, :, None, None]
        post_in = (lambda y, r: y + emb_out) if emb_out is not None else None
        h = self.conv(x, il[2], pre=self.group_norm_pre(x, il[0], il[1]), post=post_in)
        if h is None:
            return None
        skip = blk.skip_connection

        def post_out(y, r):
            r0, r1, c0, c1 = r
            return skip(x[:, :, r0:r1, c0:c1].to(self.dev)) + y
        return self.conv(h, ol[3], pre=self.group_norm_pre(h, ol[0], ol[1], extra=(ol[2],)), post=post_out,
                         reads=(x,))

    def spatial_transformer(self, st, x, context, to):
        if not isinstance(context, list):
            context = [context] * len(st.transformer_blocks)
        h, w = x.shape[2:]
        to["activations_shape"] = list(x.shape)
        norm_pre = self.group_norm_pre(x, st.norm)
        if st.use_linear:
            t = self.pointwise(x, lambda t, r: _to_image(st.proj_in(_to_tokens(norm_pre(t))), r[1] - r[0], r[3] - r[2]),
                               channels=st.proj_in.out_features)
        else:
            t = self.conv(x, st.proj_in, pre=norm_pre)
        for i, block in enumerate(st.transformer_blocks):
            to["block_index"] = i
            t = self.transformer_block(block, t, context[i], to)

        def out(tt, r):
            hh, ww = r[1] - r[0], r[3] - r[2]
            if st.use_linear:
                tt = _to_image(st.proj_out(_to_tokens(tt)), hh, ww)
            else:
                tt = st.proj_out(tt)
            return tt + x[:, :, r[0]:r[1], r[2]:r[3]].to(self.dev)
        return self.pointwise(t, out, channels=x.shape[1], reads=(x,))

    def transformer_block(self, block, t, context, to):
        patches = to.get("patches", {})
        replace = to.get("patches_replace", {}).get("attn1", {})
        blk = to.get("block")
        keys = {blk, (blk[0], blk[1], to.get("block_index", 0))} if blk is not None else set()
        attn1 = block.attn1
        # attn1 patches (HyperTile, SAG, PAG, ...) and the patches around it may look at the whole token
        # sequence; attn2 patches and replaces (IP-Adapter) are per query token and run per tile.
        token_patches = {"attn1_patch", "attn1_output_patch", "middle_patch"} & set(patches)
        lin = linfusion_for(attn1, t.shape[2] * t.shape[3])
        tileable = (type(block) is BasicTransformerBlock and not block.ff_in and not block.disable_self_attn
                    and lin is not None and not token_patches and not (keys & set(replace)))
        if not tileable:
            why = "softmax self-attention" if lin is None else "an attn1 patch"
            self.untiled_layers.append((to.get("block"), "BasicTransformerBlock: " + why))
            warn_once(("attn1", why), "tiled UNet: a transformer block with %s runs untiled on the full "
                      "activation (exact, not memory-bounded%s)", why, self._gathered())
            h, w = t.shape[2:]
            whole = _to_tokens(self._whole(t))
            y = self.part.compute(lambda: block(whole, context=context, transformer_options=to))
            self.ticks += len(self._tiles(h, w, t.shape[1]))
            return self.part.everywhere(_to_image(y, h, w).to(self.park))

        key = (id(block), tuple(t.shape), tuple(to.get("cond_or_uncond", ())))
        sigma = float(to["sigmas"].max()) if "sigmas" in to else None
        stale = self.stale.get(key) if self.stale is not None else None
        if stale is not None and sigma is not None and sigma >= stale[0]:
            stale = None  # not a later step of the same run (a new run starts at the top again): exact
        if stale is None:
            tiles = self._tiles(*t.shape[2:], t.shape[1])
            self.part.fetch(t, tiles, lambda r: r[:2])

            def part_of(r):
                part = lin.compute_state(block.norm1(_to_tokens(t[:, :, r[0]:r[1], r[2]:r[3]].to(self.dev))))
                self.part.check_interrupt()
                return part
            state = self.part.reduce(tiles, part_of, lambda acc, part: part if acc is None else acc + part,
                                     LinearAttentionState, self.dev)
        else:
            state = stale[1]
        fresh = [None]

        def apply(tt, r):
            x = _to_tokens(tt)
            n = block.norm1(x)
            if self.stale is not None:  # fast mode: this step's state, for the next step
                part = lin.compute_state(n)
                fresh[0] = part if fresh[0] is None else fresh[0] + part
            x = self._block_tail(block, x, lin.attend(n, state), context, to)
            return _to_image(x, r[1] - r[0], r[3] - r[2])
        out = self.pointwise(t, apply, channels=t.shape[1])
        if self.stale is not None:
            self.stale[key] = (sigma if sigma is not None else float("inf"), fresh[0])
        return out

    def _block_tail(self, block, x, n, context, to):
        """BasicTransformerBlock.forward after attn1 (ComfyUI 0.3.x control flow), on one tile's tokens."""
        patches = to.get("patches", {})
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=block.n_heads, dim_head=block.d_head, attn_precision=block.attn_precision)
        blk = to.get("block")
        tblock = (blk[0], blk[1], to.get("block_index", 0)) if blk is not None else None
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra)
        x = n + x
        for p in patches.get("middle_patch", []):
            x = p(x, extra)
        if block.attn2 is not None:
            n = block.norm2(x)
            ctx = n if block.switch_temporal_ca_to_sa else context
            value = None
            if "attn2_patch" in patches:
                value = ctx
                for p in patches["attn2_patch"]:
                    n, ctx, value = p(n, ctx, value, extra)
            rep = to.get("patches_replace", {}).get("attn2", {})
            key = tblock if tblock in rep else blk
            if key in rep:
                value = ctx if value is None else value
                n = block.attn2.to_out(rep[key](block.attn2.to_q(n), block.attn2.to_k(ctx),
                                                block.attn2.to_v(value), extra))
            else:
                n = block.attn2(n, context=ctx, value=value, transformer_options=to)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra)
        x = n + x
        if block.is_res:
            return x + block.ff(block.norm3(x))
        return block.ff(block.norm3(x))

    def layer(self, layer, x, emb, context, to, output_shape, extra):
        # A handler may do anything with the layer's whole input (SUPIR's cross-attention before Upsample), so a
        # layer one claims (isinstance, as ComfyUI matches them) runs untiled, through ComfyUI's own dispatch.
        handlers = to.get("patches", {}).get("forward_timestep_embed_patch", [])
        if any(isinstance(layer, c) for c, _ in handlers):
            return self.untiled(layer, x, emb, context, to, output_shape, extra, "forward_timestep_embed_patch")
        y = None
        if type(layer) is ResBlock:
            y = self.resblock(layer, x, emb)
        elif type(layer) is SpatialTransformer:
            y = self.spatial_transformer(layer, x, context, to)
            if "transformer_index" in to:
                to["transformer_index"] += 1
            return y
        elif type(layer) is Upsample and layer.dims == 2 and layer.use_conv:
            shape = tuple(output_shape[2:4]) if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
            y = self.conv(x, layer.conv, up_shape=shape)
        elif type(layer) is Downsample and layer.dims == 2 and layer.use_conv:
            y = self.conv(x, layer.op)
        elif isinstance(layer, torch.nn.Conv2d):
            y = self.conv(x, layer)
        if y is None:
            y = self.untiled(layer, x, emb, context, to, output_shape, extra)
        return y

    def block(self, seq, x, emb, context, to, output_shape, extra):
        for layer in seq:
            x = self.layer(layer, x, emb, context, to, output_shape, extra)
        return x

    # ---------------------------------------------------------------- the UNet
    def add_control(self, h, control, name):
        """openaimodel.apply_control, added on the parked activation tile by tile."""
        if control is not None and name in control and len(control[name]) > 0:
            ctrl = control[name].pop()
            if ctrl is not None:
                if ctrl.shape != h.shape:
                    warn_once("ctrl", "control could not be applied %s %s", h.shape, ctrl.shape)
                    return h
                for r0, r1, c0, c1 in self._tiles(*h.shape[2:], h.shape[1]):
                    h[:, :, r0:r1, c0:c1] += ctrl[:, :, r0:r1, c0:c1].to(h.device)
        return h

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        """Mirror of UNetModel._forward (ComfyUI 0.3.75 to 0.33, its patch hooks included) with every block run
        through the tiled layers."""
        with self.part.call():   # distributed: an error here is published to the other ranks
            return self._forward(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        unet, to = self.unet, transformer_options
        self.part.begin(x, timesteps, context, to)   # distributed: all ranks on this same call, or raise
        to["original_shape"] = list(x.shape)
        to["transformer_index"] = 0
        tp = to.get("patches", {})
        extra = dict(time_context=kwargs.get("time_context", None),
                     num_video_frames=kwargs.get("num_video_frames", unet.default_num_video_frames),
                     image_only_indicator=kwargs.get("image_only_indicator", None))
        assert (y is not None) == (unet.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        if self.progress:
            # Inside a job (the ladder) the ticks move its one bar; alone, a bar of this call's own.
            self.pbar = progress.NestedBar(self.expected_ticks)
        t_emb = timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype)
        emb = self.part.compute(lambda: unet.time_embed(t_emb))
        for p in tp.get("emb_patch", []):
            emb = p(emb, unet.model_channels, to)
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y)

        hs = []
        h = self.part.everywhere(x.to(self.park).view(x.shape))   # (a view: the row map is not set on x)
        for i, module in enumerate(unet.input_blocks):
            to["block"] = ("input", i)
            h = self.block(module, h, emb, context, to, None, extra)
            h = self.add_control(h, control, "input")
            for p in tp.get("input_block_patch", []):
                h = self.part.everywhere(p(self._whole(h), to).to(self.park))
            hs.append(h)
            for p in tp.get("input_block_patch_after_skip", []):
                h = self.part.everywhere(p(self._whole(h), to).to(self.park))
        to["block"] = ("middle", 0)
        if unet.middle_block is not None:
            h = self.block(unet.middle_block, h, emb, context, to, None, extra)
        h = self.add_control(h, control, "middle")
        for p in tp.get("middle_block_after_patch", []):
            h = self.part.everywhere(p({"h": self._whole(h), "x": x, "emb": emb, "context": context, "y": y,
                                        "timesteps": timesteps, "transformer_options": to})["h"].to(self.park))
        for i, module in enumerate(unet.output_blocks):
            to["block"] = ("output", i)
            hsp = self.add_control(hs.pop(), control, "output")
            for p in tp.get("output_block_patch", []):
                h, hsp = p(self._whole(h), None if hsp is None else self._whole(hsp), to)
                h = self.part.everywhere(h.to(self.park))
                hsp = None if hsp is None else self.part.everywhere(hsp.to(self.park))
            if hsp is not None:  # a patch that merged the skip connection itself returns None for it (SUPIR)
                h = self.part.cat(h, hsp)
            del hsp
            output_shape = hs[-1].shape if len(hs) > 0 else None
            h = self.block(module, h, emb, context, to, output_shape, extra)
        if h.dtype != x.dtype:
            h = self.part.retyped(h, x.dtype)
        norm, act, conv = unet.out
        out = self.conv(h, conv, pre=self.group_norm_pre(h, norm, act))
        return self.part.release(self.part.gather(out)).to(x.device)


def supports(unet) -> str | None:
    """None when `unet` can run tiled, else why not."""
    if not isinstance(unet, UNetModel):
        return f"{type(unet).__name__} is not a UNet of the SD1.x/SD2.x/SDXL family"
    if unet.predict_codebook_ids:
        return "codebook-predicting UNets are not supported"
    if len(unet.out) != 3 or not isinstance(unet.out[0], torch.nn.GroupNorm):
        return "unexpected output head"
    return None

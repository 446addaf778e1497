"""The exact tiled VAE (tiled_vae.py) split over the ranks of a torch.distributed process group: one image, several
processes, the same seam as the distributed tiled UNet (tiled_unet_distributed.py), whose row maps, point-to-point
row exchanges, ordered reductions and fault handling this reuses.

Every rank runs the same decode (or encode) of the same latent (SPMD). Each layer's tiles are the single process's
(`tiled_vae_passes.TiledPasses`); a rank computes those whose first row lies in its strip of rows (or, `aligned`,
the grid cut at the strips). Across ranks move only:

- the rows a tile reads that another rank computed: a convolution's halo, the source rows of an upsample, the
  stride-2 window of a downsample, and in the default mode whole tile rows where a layer's grid differs from its
  input's (point to point, `batch_isend_irecv`);
- the GroupNorm statistics: each rank folds its tiles' per-channel (count, mean, M2) after the parts of the ranks
  before it, in the single process's tile order, and the last rank broadcasts the result: every rank normalises
  with identical statistics, the single process's bits;
- the mid-block attention's keys and values: each rank computes k and v of its strip, then every rank that has
  query tiles gathers all of them (softmax over the whole map needs every key) and runs the same online softmax
  over the same key chunks as one process, so its query tiles are the single process's bits. The keys are the
  map at the lowest resolution (1/64 of the pixels): gathering them costs less than one full-resolution halo;
- the output: gathered on every rank (as the tiled UNet's): the rest of the workflow runs on every rank (only rank
  0 saves), so a next stage (an encode, an upscale) has the image everywhere. It is 3 channels, the smallest
  full-resolution tensor of the decode.

With the default partition a rank's result is bitwise the single-process tiled decode; with `aligned` it is exact
to fp32 rounding (each rank's tiles are cut at the strips, so only halos move). A one-process run never comes
here: `TiledPasses(partition=None)` is the tiled VAE it always was.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .group_norm_stats import ChannelStats, channel_part, merge_parts
from . import tiled_vae
from .tiled_unet_distributed import DistributedMismatch, Strips
from .tiled_vae import _decoder_input, _encoder_output, _load, _passes, _tile_working_bytes, _walk_decoder, \
    _walk_encoder, unsupported_reason
from .tiled_vae_passes import Parked

log = logging.getLogger("LinFusion")

OPS = ("decode", "encode")
FINGERPRINT = ["call number", "decode or encode", "tile size", "aligned", "x shape[0]", "x shape[1]", "x shape[2]",
               "x shape[3]", "x sum", "x sum of squares", "x weighted sum"]


class VAEStrips(Strips):
    """The tiled VAE's tiles split by rows over the ranks of a process group (see the module's docstring)."""
    what = "tiled VAE"

    def __init__(self, group=None, weights=None, aligned: bool = False):
        super().__init__(group, weights, aligned)
        self.base_rows = None            # rows of the map the strips are cut on (the latent for a decode)

    # ---------------------------------------------------------------- rows
    def strip(self, rows: int, rank: int) -> tuple[int, int]:
        """The decoder's maps grow from the latent by x2 upsamples: a larger map's strip is the latent's strip
        scaled up (the upsampled strip, so an upsample reads mostly its own rows). Smaller maps (the encoder's,
        cut on the image) as the UNet's: the strip divided by the level's power of two."""
        if self.base_rows is None or rows <= self.base_rows:
            return super().strip(rows, rank)
        lo, hi = super().strip(self.base_rows, rank)
        return lo * rows // self.base_rows, hi * rows // self.base_rows

    # ---------------------------------------------------------------- one layer (TiledPasses._run's seam)
    def run_layer(self, passes, shape, cores, make_tile, reads, with_stats, park_device) -> Parked:
        """This rank's tiles of one layer: fetch the rows they read, compute them, merge the statistics."""
        mine = self.mine(cores)
        passes.tile_count += len(mine)
        if passes.dry:
            return Parked(shape)
        for src, rows_of in reads:
            if rows_of is None:         # every row: the attention's keys and values, for ranks with query tiles
                before, rows = self.sent.get("rows", 0), src.tensor.shape[2]
                self.fetch(src.tensor, cores, lambda core: (0, rows))
                self._recount("rows", "keys", before)
            else:
                self.fetch(src.tensor, cores, rows_of)
        channels, height, width = shape
        out = torch.empty((1, channels, height, width), dtype=passes.dtype, device=park_device or passes.park_device)
        parts = {}
        for core in mine:
            y0, y1, x0, x1 = core
            # A cancel is taken only at the reductions, by every rank together (Strips): ComfyUI's per-op check
            # inside make_tile is held and the tile (which exchanges nothing) computed again.
            self.check_interrupt()
            tile = self.compute(lambda: make_tile(y0, y1, x0, x1).to(passes.dtype))
            if with_stats:
                parts[core] = channel_part(tile)
            out[:, :, y0:y1, x0:x1] = tile.to(out.device)
            del tile
            if passes.on_tile is not None:
                passes.on_tile()
        self.produced(out, cores)
        stats = None
        if with_stats:      # in the single process's tile order: rank 0's tiles, then rank 1's, ...
            merged = self.reduce(cores, parts.__getitem__, merge_parts, tuple, passes.device)
            stats = ChannelStats(channels, passes.device)
            stats.count, stats.mean, stats.m2 = merged
        return Parked(shape, out, stats)

    def _recount(self, kind: str, as_kind: str, before: int) -> None:
        """Bytes sent as `kind` since it stood at `before` are counted as `as_kind` instead."""
        moved = self.sent.get(kind, 0) - before
        self.sent[kind] = before
        self.sent[as_kind] = self.sent.get(as_kind, 0) + moved

    def gather_output(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank receives all rows of the last layer's output; returned without a row map."""
        before = self.sent.get("rows", 0)
        self._transfer(t, [(0, t.shape[2])] * self.world)
        self._recount("rows", "output", before)
        return self.release(t)

    # ---------------------------------------------------------------- calls
    # A call is one image of a decode (encode): start_call() (Strips': counters, and in a launched session the
    # per-call go/cancel decision every rank reads), then the latent-sized input, then begin().
    def begin(self, op: str, x: torch.Tensor, tile_size: int, base_rows: int) -> None:
        """Check that every rank is on the same decode/encode (same latent, tile size and mode); raise
        DistributedMismatch on every rank if not."""
        self.base_rows = self.latent_rows = int(base_rows)
        fp = vae_fingerprint(self.call_in_prompt, op, tile_size, self.aligned, x).to(self.comm)
        every = [torch.empty_like(fp) for _ in range(self.world)]
        self._wait([self.dist.all_gather(every, fp, self.group, async_op=True)])
        self._count("check", fp)
        every = [e.cpu().view(torch.int64) for e in every]     # bits: a NaN equals itself
        bad = [k for k, e in enumerate(every) if not torch.equal(e, every[0])]
        if bad:
            fields = [name for i, name in enumerate(FINGERPRINT) if any(e[i] != every[0][i] for e in every)]
            raise DistributedMismatch(
                f"[LinFusion] distributed tiled VAE: rank(s) {bad} are not on rank 0's VAE {op} (differing: "
                f"{', '.join(fields)}); every rank must decode the same latent with the same tile size")


def vae_fingerprint(call: int, op: str, tile_size: int, aligned: bool, x: torch.Tensor) -> torch.Tensor:
    xd = x.detach().double().reshape(-1)
    ramp = torch.arange(1, xd.numel() + 1, dtype=torch.float64, device=xd.device).remainder_(9973)
    shape = list(x.shape) + [0] * (4 - x.ndim)
    vals = [call, OPS.index(op), tile_size, int(aligned)] + shape[:4] + [
        xd.sum().item(), xd.square().sum().item(), (xd * ramp).sum().item()]
    return torch.tensor(vals, dtype=torch.float64)


# ---------------------------------------------------------------- decode / encode over the ranks
def _partition(partition):
    return partition if partition is not None else VAEStrips()


@torch.no_grad()
def decode_raw(vae, samples: torch.Tensor, tile_size: int = 512, park: str = "cpu",
               on_progress: Optional[Callable[[int, int], None]] = None, partition: Optional[VAEStrips] = None
               ) -> torch.Tensor:
    """tiled_vae.decode_raw with this rank computing its strip of every layer; every rank returns the whole
    decoder output (bitwise the single process's with the default partition). Every rank must call it with the
    same latent and tile size (checked). `on_progress(done, total)` counts this rank's tiles."""
    part = _partition(partition)
    reason = unsupported_reason(vae)
    if reason is not None:
        raise NotImplementedError(f"exact tiled VAE does not handle this VAE: {reason}")
    model = vae.first_stage_model
    out_device = vae.output_device
    extra = vae.memory_used_decode(samples.shape, vae.vae_dtype) if park == "accelerator" else 0
    _load(vae, _tile_working_bytes(vae, tile_size) + extra)
    outputs, done, total = [], [0], None
    for i in range(samples.shape[0]):
        with part.call():   # an error here is published, so the other ranks stop waiting for this one
            part.start_call()
            z = part.compute(lambda i=i: _decoder_input(model, samples[i:i + 1].to(vae.device, vae.vae_dtype)))
            part.begin("decode", z, tile_size, z.shape[2])
            walk = lambda p, z=z: _walk_decoder(p, model.decoder, p.park(z, with_stats=False) if not p.dry  # noqa: E731
                                                else Parked(tuple(z.shape[1:])), out_device)
            if total is None:
                counting = _passes(vae, tile_size, park, None, dry=True, partition=part)
                walk(counting)
                total = counting.tile_count * samples.shape[0]

            def tick():
                done[0] += 1
                if on_progress is not None:   # a progress bar raises on cancel: held for the next reduction
                    part.report(lambda n=done[0]: on_progress(n, total))
            out = part.gather_output(walk(_passes(vae, tile_size, park, tick, dry=False, partition=part)).tensor)
        if model.decoder.tanh_out:
            out = torch.tanh(out)
        outputs.append(out.float())
    _log_split(part, "decode", total, samples.shape)
    return torch.cat(outputs, dim=0)


@torch.no_grad()
def encode_raw(vae, pixels: torch.Tensor, tile_size: int = 512, park: str = "cpu",
               on_progress: Optional[Callable[[int, int], None]] = None, partition: Optional[VAEStrips] = None
               ) -> torch.Tensor:
    """tiled_vae.encode_raw split over the ranks as decode_raw is (the strips cut on the image's rows)."""
    part = _partition(partition)
    reason = unsupported_reason(vae)
    if reason is not None:
        raise NotImplementedError(f"exact tiled VAE does not handle this VAE: {reason}")
    model = vae.first_stage_model
    extra = vae.memory_used_encode(pixels.shape, vae.vae_dtype) if park == "accelerator" else 0
    _load(vae, _tile_working_bytes(vae, tile_size) + extra)
    outputs, done, total = [], [0], None
    for i in range(pixels.shape[0]):
        with part.call():
            part.start_call()
            x = pixels[i:i + 1].to(vae.vae_dtype)
            part.begin("encode", x, tile_size, x.shape[2])

            def walk(p, x=x):
                if p.dry:
                    return _walk_encoder(p, model.encoder, Parked(tuple(x.shape[1:])))
                whole = part.everywhere(x.view(x.shape))   # every rank has the whole input (a view: x keeps no map)
                return _walk_encoder(p, model.encoder, Parked(tuple(x.shape[1:]), whole))
            if total is None:
                counting = _passes(vae, tile_size, park, None, dry=True, partition=part)
                walk(counting)
                total = counting.tile_count * pixels.shape[0]

            def tick():
                done[0] += 1
                if on_progress is not None:   # a progress bar raises on cancel: held for the next reduction
                    part.report(lambda n=done[0]: on_progress(n, total))
            z = part.gather_output(walk(_passes(vae, tile_size, park, tick, dry=False, partition=part)).tensor)
        outputs.append(_encoder_output(model, z).to(vae.output_device).float())
    _log_split(part, "encode", total, pixels.shape)
    return torch.cat(outputs, dim=0)


def decode(vae, samples: torch.Tensor, tile_size: int = 512, park: str = "cpu", on_progress=None,
           partition: Optional[VAEStrips] = None) -> torch.Tensor:
    """Like VAE.decode: an IMAGE (B x H x W x 3 in [0, 1]), on every rank."""
    vae.throw_exception_if_invalid()
    raw = decode_raw(vae, samples, tile_size, park, on_progress, partition)
    return vae.process_output(raw).to(vae.output_device).movedim(1, -1)


def encode(vae, pixels: torch.Tensor, tile_size: int = 512, park: str = "cpu", on_progress=None,
           partition: Optional[VAEStrips] = None) -> torch.Tensor:
    """Like VAE.encode: a latent from an IMAGE (B x H x W x C in [0, 1]), on every rank."""
    vae.throw_exception_if_invalid()
    pixels = vae.vae_encode_crop_pixels(pixels)[..., :3].movedim(-1, 1)
    return encode_raw(vae, vae.process_input(pixels), tile_size, park, on_progress, partition)


def _log_split(part: VAEStrips, op: str, tiles: int, shape) -> None:
    log.info("[LinFusion] distributed tiled VAE %s: rank %d of %d computed %d tiles (input %s)", op, part.rank,
             part.world, tiles, "x".join(map(str, shape)))


# ---------------------------------------------------------------- what the nodes call
def launcher_partition() -> Optional[VAEStrips]:
    """VAEStrips over the launcher's ranks (None with one rank); an error naming the launcher without it."""
    from .distributed_session import require
    return VAEStrips() if require("tiled VAE", "the VAE").world > 1 else None


def _fallback_note(note: str, part: VAEStrips) -> str:
    return (f"{note} 'distributed' is on: each of the {part.world} ranks ran it itself, not split (the same "
            f"result on every rank).")


def decode_or_fallback(vae, samples: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None,
                       distributed: bool = False):
    """(IMAGE, note) as tiled_vae.decode_or_fallback; distributed=True splits the exact tiled decode over the
    launcher's ranks (one rank: the single-process path). A VAE the exact path does not handle is decoded by
    every rank itself, untiled (exact, no exchange, so nothing to hang on); never ComfyUI's inexact tiles there,
    which a rank would choose by its own free memory: the ranks could then hold different images."""
    part = launcher_partition() if distributed else None
    if part is None:
        return tiled_vae.decode_or_fallback(vae, samples, tile_size, park, on_progress)
    if tiled_vae.unsupported_reason(vae) is None and samples.ndim == 4:
        return decode(vae, samples, tile_size, park, on_progress, part), None
    images, note = tiled_vae.decode_or_fallback(vae, samples, tile_size, park, on_progress, inexact_ok=False)
    note = _fallback_note(note, part)
    log.warning(note)
    return images, note


def encode_or_fallback(vae, pixels: torch.Tensor, tile_size: int, park: str = "cpu", on_progress=None,
                       distributed: bool = False):
    """(latent, note) as tiled_vae.encode_or_fallback, split over the launcher's ranks as decode_or_fallback."""
    part = launcher_partition() if distributed else None
    if part is None:
        return tiled_vae.encode_or_fallback(vae, pixels, tile_size, park, on_progress)
    if tiled_vae.unsupported_reason(vae) is None:
        return encode(vae, pixels, tile_size, park, on_progress, part), None
    latent, note = tiled_vae.encode_or_fallback(vae, pixels, tile_size, park, on_progress, inexact_ok=False)
    note = _fallback_note(note, part)
    log.warning(note)
    return latent, note

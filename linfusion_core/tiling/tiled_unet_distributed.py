"""Patch parallelism for the tiled UNet (tiled_unet.py) over torch.distributed: one image, several processes.

The runner asks a partition which tiles to compute and tells it what each tile reads; `Local` (one process)
answers "all of them" and does nothing else, so without a process group the runner is what it always was.
`Strips` splits every layer's tile grid by rows over the ranks of a process group (SPMD: every rank runs the
same UNet call on the same inputs):

- rows: each map's rows are cut into one contiguous strip per rank, the latent's cut scaled to the level (a
  deeper level's strip is the downsampled strip, so skip connections stay where they were made); a rank
  computes the tiles of the runner's own grid whose first row lies in its strip. The tiles are exactly the
  single-process runner's, so every number is computed by the same kernels on the same window.
- activations stay full size on every rank but only some rows are valid there. A tensor carries which rows
  each rank owns (computed) and holds (owned or received); before a layer reads rows a rank lacks (a
  convolution's halo, a tile of another grid), the owners send them (point to point, only those rows).
- reductions (GroupNorm statistics, the LinFusion state) fold the tiles' parts in the single process's tile
  order: rank 0 folds its parts and hands the running value to rank 1, which folds its own, ..., the last
  rank broadcasts the result. Every rank gets the same bits, and the single process's bits.
- what cannot be split (softmax self-attention, attn1 patches, unknown layers, the patches that see whole
  activations) is gathered: every rank receives the whole input and runs that layer itself (exact,
  redundant); the runner's `untiled_layers` names each. The output is gathered on every rank, so a sampler
  on each rank keeps identical latents.
- every call starts with a check that all ranks run the same call (shapes, timesteps, sigma, checksums of x
  and the conditioning); a mismatch raises `DistributedMismatch` on every rank instead of hanging.
- faults: an exception inside a rank's call is published in the rendezvous store; the other ranks notice it
  while they wait (gloo: within about 0.1 s) and raise `DistributedFault` naming the rank and its error; a
  rank that dies closes its sockets (its peers' waits fail at once); the process group's timeout is the
  backstop for a rank that hangs. A fault ends the session: every later call raises.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import datetime
import math
import os
import time

import torch

ROWS_ATTR = "_linfusion_rows"   # the row map of a parked activation (tensor attribute)
ABORT_KEY = "linfusion/tiled_unet/abort"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HEADER = 33     # int64 slots describing one reduction message; the last one carries rank 0's cancel


class DistributedMismatch(RuntimeError):
    """The ranks are not on the same UNet call."""


class DistributedFault(RuntimeError):
    """Another rank failed; this distributed session is over."""


# ---------------------------------------------------------------- row intervals
def _subtract(a: tuple[int, int], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [a0, a1) not covered by the sorted disjoint intervals `have`."""
    out, lo = [], a[0]
    for h0, h1 in have:
        if h1 <= lo or h0 >= a[1]:
            continue
        if h0 > lo:
            out.append((lo, h0))
        lo = max(lo, h1)
    if lo < a[1]:
        out.append((lo, a[1]))
    return out


def _union(have: list[tuple[int, int]], a: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    for h in sorted(have + [a]):
        if h[0] >= h[1]:
            continue
        if out and h[0] <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], h[1]))
        else:
            out.append(h)
    return out


class Rows:
    """Which rows of a parked activation each rank owns (computed: disjoint, covering the map) and holds."""
    __slots__ = ("owner", "valid")

    def __init__(self, owner, valid=None):
        self.owner = list(owner)
        self.valid = [[o] if o[0] < o[1] else [] for o in owner] if valid is None else valid


# ---------------------------------------------------------------- one process
class Local:
    """One process: every tile here, nothing to exchange. The runner's behaviour without a process group."""
    rank, world = 0, 1
    distributed = False

    def begin(self, x, timesteps, context, transformer_options) -> None:
        pass

    @contextlib.contextmanager
    def call(self):
        yield

    def mine(self, tiles):
        return tiles

    def check_interrupt(self) -> None:
        """A cancel check of the runner's (per tile): one process stops where it is."""
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()

    def report(self, update) -> None:
        """update(): a progress report (ComfyUI's progress hook raises there on cancel)."""
        update()

    def compute(self, fn):
        """fn(): one tile's (or an untiled layer's) computation, which has no exchange in it."""
        return fn()

    def fetch(self, t, tiles, rows_of) -> None:
        """Make the rows rows_of(tile) of t, for every tile this rank computes, valid here."""

    def produced(self, out, tiles):
        """out's rows were computed tile by tile: each rank holds those of its tiles."""
        return out

    def everywhere(self, t):
        """t is whole on every rank (computed identically by each)."""
        return t

    def gather(self, t):
        """Every rank receives all of t's rows."""
        return t

    def cat(self, h, hsp):
        return torch.cat([h, hsp], dim=1)

    def retyped(self, t, dtype):
        return t.type(dtype)

    def release(self, t):
        """t leaves the runner: no row map on it any more."""
        if hasattr(t, ROWS_ATTR):
            delattr(t, ROWS_ATTR)
        return t

    def reduce(self, tiles, compute, fold, ctor=None, device=None):
        """fold(...fold(fold(None, compute(t0)), compute(t1))...) over the tiles in order; ctor rebuilds a
        value received from another rank (tuple or a dataclass), device is where it lands."""
        acc = None
        for tile in tiles:
            acc = fold(acc, compute(tile))
        return acc


LOCAL = Local()


# ---------------------------------------------------------------- a process group
def _pack(obj, device, cancel=0):
    """(header, payload) for None, a tuple or a dataclass of ints and same-dtype tensors."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[HEADER - 1] = cancel
    if obj is None:
        return header.to(device), None
    leaves = list(obj) if isinstance(obj, tuple) else [getattr(obj, f) for f in obj.__dataclass_fields__]
    if 2 + 6 * len(leaves) > HEADER - 1:
        raise ValueError(f"[LinFusion] distributed: cannot send a reduction of {len(leaves)} values")
    header[0], header[1] = 1, len(leaves)
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    dtype = tensors[0].dtype if tensors else torch.float32
    for i, v in enumerate(leaves):
        slot = header[2 + 6 * i: 8 + 6 * i]
        if isinstance(v, torch.Tensor):
            if v.dtype != dtype or v.ndim > 4:
                raise ValueError(f"[LinFusion] distributed: cannot send a {v.dtype} tensor of {v.ndim} dims here")
            slot[0], slot[1] = 1 + DTYPES.index(dtype), v.ndim
            slot[2:2 + v.ndim] = torch.tensor(v.shape)
        else:
            slot[0], slot[1] = 0, int(v)
    payload = torch.cat([v.reshape(-1).to(device) for v in tensors]) if tensors else None
    return header.to(device), payload


def _payload_size(header):
    h = header.tolist()
    size, dtype = 0, None
    for i in range(h[1]):
        slot = h[2 + 6 * i: 8 + 6 * i]
        if slot[0]:
            dtype = DTYPES[slot[0] - 1]
            size += math.prod(slot[2:2 + slot[1]])
    return size, dtype


def _unpack(header, payload, ctor, device):
    h = header.tolist()
    if not h[0]:
        return None
    leaves, at = [], 0
    for i in range(h[1]):
        slot = h[2 + 6 * i: 8 + 6 * i]
        if slot[0]:
            shape = slot[2:2 + slot[1]]
            n = math.prod(shape)
            leaves.append(payload[at:at + n].reshape(shape).to(device))
            at += n
        else:
            leaves.append(slot[1])
    return tuple(leaves) if ctor in (None, tuple) else ctor(*leaves)


class Strips(Local):
    """The tiles of every layer split by rows over the ranks of a torch.distributed process group."""
    distributed = True
    what = "tiled UNet"      # the seam's name in its errors and logs (VAEStrips: "tiled VAE")

    def __init__(self, group=None, weights=None, aligned: bool = False):
        """weights: relative strip heights per rank (equal by default). aligned: cut every tile grid at the
        strips (a tile across a strip boundary becomes two), so that each rank owns exactly its strip at every
        layer and only convolution halos move; exact to fp32 rounding, not bitwise the single process's tiles.
        The default keeps the single process's tiles (bitwise equal to it) and moves whole tile rows where two
        layers' grids differ."""
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"[LinFusion] distributed {self.what}: no torch.distributed process group; start "
                               "the ranks with torchrun (or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) and "
                               "call tiled_unet_distributed.init_from_env()")
        self.dist, self.group, self.aligned = dist, group, bool(aligned)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.comm = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        # relative strip heights per rank (equal by default)
        self.weights = list(weights) if weights is not None else [1] * self.world
        if len(self.weights) != self.world or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"[LinFusion] distributed: {len(self.weights)} strip weights for {self.world} ranks")
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:   # no store to publish faults in: the process group's timeout still ends the wait
            self.store = None
        self.calls = 0
        self.call_in_prompt = 0   # this call's number in its prompt (a launched session), else self.calls
        self.reductions = 0       # in the current call: the cancel checkpoints passed
        self.cancelled = False    # the current call stopped on a cancel every rank took together
        self.pending = False      # a cancel ComfyUI raised inside this call, held for the next checkpoint
        self.waiter = None       # the gloo waits' helper thread
        self.latent_rows = None
        self.sent = {}           # bytes this rank sent in the current call, by kind
        self.waits = {}          # waits for other ranks in the current call: count "n", seconds "s"
        self.last_sent = {}      # ... in the previous call

    # ---------------------------------------------------------------- rows and tiles
    def _global(self, rank):
        return self.dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def strip(self, rows: int, rank: int) -> tuple[int, int]:
        """Rank's strip of a map `rows` high: the latent's cut, divided by the level's power of two."""
        H0 = self.latent_rows or rows
        shift = max(0, round(math.log2(H0 / rows))) if rows else 0
        total, acc = sum(self.weights), sum(self.weights[:rank])
        cut = lambda a: -(-(a * H0 // total) >> shift) if a < total else rows  # noqa: E731
        return min(cut(acc), rows), min(cut(acc + self.weights[rank]), rows)

    def assign(self, tiles, rank):
        """The tiles `rank` computes: those whose first row lies in its strip."""
        if not tiles:
            return []
        lo, hi = self.strip(max(t[1] for t in tiles), rank)
        if self.aligned:
            return [(max(t[0], lo), min(t[1], hi), t[2], t[3]) for t in tiles if t[0] < hi and t[1] > lo]
        return [t for t in tiles if lo <= t[0] < hi]

    def mine(self, tiles):
        return self.assign(tiles, self.rank)

    # ---------------------------------------------------------------- cancel: every rank at the same checkpoint
    # A rank that stopped alone, at its own tile, would leave the others waiting in a collective it never
    # joins (and the process group out of step). So inside a call a cancel is only read at the reductions,
    # where every rank is anyway: rank 0's interrupt flag rides the reduction's header along the chain and
    # back in the broadcast, and every rank raises ComfyUI's cancel after the same reduction. Before a call,
    # the session's per-call decision does the same (distributed_session.Session.enter).
    # ComfyUI itself raises its cancel inside layers (comfy.ops checks the flag before every op), so a
    # tile's computation (which exchanges nothing) that a cancel cuts short is computed again and the cancel is
    # held (`pending`) for the next checkpoint; what a call ends with still pending goes back to ComfyUI's flag.
    def check_interrupt(self) -> None:
        """Per-tile checks are not checkpoints here (the cancel waits for the next reduction)."""

    def _held(self, fn):
        import comfy.model_management
        while True:
            try:
                return fn()
            except comfy.model_management.InterruptProcessingException:
                self.pending = True

    def report(self, update) -> None:
        """ComfyUI's progress hook raises on cancel: the cancel waits for the next checkpoint instead."""
        self._held(update)

    def compute(self, fn):
        return self._held(fn)

    def _cancel_bit(self) -> int:
        if self.rank != 0:
            return 0
        import comfy.model_management
        return int(self.pending or comfy.model_management.processing_interrupted())

    def _cancel_together(self):
        from . import distributed_session
        self.cancelled, self.pending = True, False
        where = f"after reduction {self.reductions}"
        session = distributed_session.active()
        if session is not None:
            session.cancel(distributed_session.current_prompt_id(), self.call_in_prompt, where, self.what)
        distributed_session.log.warning("[LinFusion] distributed rank %d: %s cancelled at its call %d, %s",
                                        self.rank, self.what, self.calls, where)
        distributed_session.raise_interrupt()

    def _rows(self, t) -> Rows:
        rows = getattr(t, ROWS_ATTR, None)
        if rows is None or len(rows.owner) != self.world:
            raise RuntimeError(f"[LinFusion] distributed {self.what}: an activation without a row map (an internal "
                               "error: a layer's output was not registered with the partition)")
        return rows

    def produced(self, out, tiles):
        owner, H = [], out.shape[2]
        if self.aligned:
            setattr(out, ROWS_ATTR, Rows([self.strip(H, k) for k in range(self.world)]))
            return out
        starts = sorted({t[0] for t in tiles})
        for k in range(self.world):
            lo, hi = self.strip(H, k)
            a = bisect.bisect_left(starts, lo)
            b = bisect.bisect_left(starts, hi)
            first = starts[a] if a < len(starts) else H
            end = starts[b] if b < len(starts) else H
            owner.append((first, max(first, end)))
        setattr(out, ROWS_ATTR, Rows(owner))
        return out

    def everywhere(self, t):
        H = t.shape[2]
        setattr(t, ROWS_ATTR, Rows([self.strip(H, k) for k in range(self.world)],
                                   [[(0, H)] for _ in range(self.world)]))
        return t

    # ---------------------------------------------------------------- exchanges
    def _transfer(self, t, need):
        """need[k]: the row interval rank k must hold (or None). Owners send what is missing, point to point."""
        rows = self._rows(t)
        plan = []
        for k, want in enumerate(need):
            if want is None or want[0] >= want[1]:
                continue
            for lo, hi in _subtract(want, rows.valid[k]):
                for j, (o0, o1) in enumerate(rows.owner):
                    a, b = max(lo, o0), min(hi, o1)
                    if j != k and a < b:
                        plan.append((j, k, a, b))
        plan.sort()
        ops, landing = [], []
        for src, dst, a, b in plan:
            if src == self.rank:
                buf = t[:, :, a:b].to(self.comm).contiguous()
                ops.append(self.dist.P2POp(self.dist.isend, buf, self._global(dst), self.group))
                self._count("rows", buf)
            elif dst == self.rank:
                buf = torch.empty((t.shape[0], t.shape[1], b - a, t.shape[3]), dtype=t.dtype, device=self.comm)
                ops.append(self.dist.P2POp(self.dist.irecv, buf, self._global(src), self.group))
                landing.append((a, b, buf))
        if ops:
            self._wait(self.dist.batch_isend_irecv(ops))
        for a, b, buf in landing:
            t[:, :, a:b] = buf.to(t.device)
        for k, want in enumerate(need):
            if want is not None and want[0] < want[1]:
                rows.valid[k] = _union(rows.valid[k], want)

    def fetch(self, t, tiles, rows_of):
        H, need = t.shape[2], []
        for k in range(self.world):
            spans = [rows_of(tile) for tile in self.assign(tiles, k)]
            need.append((max(0, min(s[0] for s in spans)), min(H, max(s[1] for s in spans))) if spans else None)
        self._transfer(t, need)

    def gather(self, t):
        H = t.shape[2]
        before = self.sent.get("rows", 0)
        self._transfer(t, [(0, H)] * self.world)
        self.sent["gather"] = self.sent.get("gather", 0) + self.sent.get("rows", 0) - before
        self.sent["rows"] = before
        return self.everywhere(t)

    def cat(self, h, hsp):
        """torch.cat on dim 1 of two maps of one level: hsp's rows move to where h's are."""
        hr, sr = self._rows(h), self._rows(hsp)
        H = h.shape[2]
        whole = lambda r: all(v == [(0, H)] for v in r.valid)  # noqa: E731
        if whole(hr) and whole(sr):
            return self.everywhere(torch.cat([h, hsp], dim=1))
        owner = sr.owner if whole(hr) else hr.owner
        for t, r in ((h, hr), (hsp, sr)):
            if not whole(r):
                self._transfer(t, owner)
        out = torch.cat([h, hsp], dim=1)
        setattr(out, ROWS_ATTR, Rows(owner))
        return out

    def retyped(self, t, dtype):
        rows = self._rows(t)
        out = t.type(dtype)
        setattr(out, ROWS_ATTR, Rows(rows.owner, [list(v) for v in rows.valid]))
        return out

    # ---------------------------------------------------------------- reductions in tile order
    def _send_obj(self, obj, dst, cancel=0):
        header, payload = _pack(obj, self.comm, cancel)
        self._wait([self.dist.isend(header, self._global(dst), self.group)]
                   + ([self.dist.isend(payload, self._global(dst), self.group)] if payload is not None else []))
        self._count("reduce", header, payload)

    def _recv_obj(self, src, ctor, device):
        """(the object, the cancel slot)."""
        header = torch.empty(HEADER, dtype=torch.int64, device=self.comm)
        self._wait([self.dist.irecv(header, self._global(src), self.group)])
        size, dtype = _payload_size(header.cpu())
        payload = None
        if size:
            payload = torch.empty(size, dtype=dtype, device=self.comm)
            self._wait([self.dist.irecv(payload, self._global(src), self.group)])
        return _unpack(header.cpu(), payload, ctor, device), int(header[HEADER - 1])

    def _bcast_obj(self, obj, root, ctor, device, cancel=0):
        """(the object, the root's cancel slot) on every rank."""
        header, payload = _pack(obj, self.comm, cancel) if self.rank == root else (
            torch.empty(HEADER, dtype=torch.int64, device=self.comm), None)
        self._wait([self.dist.broadcast(header, self._global(root), self.group, async_op=True)])
        size, dtype = _payload_size(header.cpu())
        if size:
            if payload is None:
                payload = torch.empty(size, dtype=dtype, device=self.comm)
            self._wait([self.dist.broadcast(payload, self._global(root), self.group, async_op=True)])
        cancel = int(header[HEADER - 1])
        if self.rank == root:
            self._count("reduce", header, payload)
            return obj, cancel
        return _unpack(header.cpu(), payload, ctor, device), cancel

    def reduce(self, tiles, compute, fold, ctor=None, device=None):
        parts = [self.compute(lambda tile=tile: compute(tile)) for tile in self.mine(tiles)]   # while the ranks before this one fold theirs
        device = device or self.comm
        acc, cancel = self._recv_obj(self.rank - 1, ctor, device) if self.rank > 0 else (None, self._cancel_bit())
        for p in parts:
            acc = fold(acc, p)
        if self.rank < self.world - 1:
            self._send_obj(acc, self.rank + 1, cancel)
        acc, cancel = self._bcast_obj(acc, self.world - 1, ctor, device, cancel)
        self.reductions += 1
        if cancel:   # every rank got the same bit in the same broadcast: all stop here, nothing left in flight
            self._cancel_together()
        return acc

    # ---------------------------------------------------------------- calls, checks, faults
    def _count(self, kind, *tensors):
        n = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        self.sent[kind] = self.sent.get(kind, 0) + n

    def _aborted(self):
        if self.store is None:
            return None
        try:
            if self.store.check([ABORT_KEY]):
                return self.store.get(ABORT_KEY).decode(errors="replace")
        except Exception:   # the store went away with the rank that hosted it
            return "the rendezvous store is gone (rank 0 ended)"
        return None

    def _wait(self, works):
        """Wait for p2p/collective works. On gloo the wait runs in a helper thread while this one watches the
        store: a fault another rank publishes ends the wait within ~50 ms (gloo's point-to-point works cannot
        be polled, and a wait cannot be interrupted; the abandoned one ends at the process group's timeout)."""
        started = time.perf_counter()
        try:
            self._wait_works(works)
        finally:
            self.waits["n"] = self.waits.get("n", 0) + 1
            self.waits["s"] = self.waits.get("s", 0.0) + time.perf_counter() - started

    def _wait_works(self, works):
        if self.backend == "nccl":   # stream-ordered: wait() does not block the host
            for w in works:
                w.wait()
            return
        if self.waiter is None:
            self.waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="linfusion-dist-wait")
        done = self.waiter.submit(lambda: [w.wait() for w in works])
        while True:
            try:
                done.result(timeout=0.05)
                return
            except concurrent.futures.TimeoutError:
                why = self._aborted()
                if why is not None:
                    raise DistributedFault(f"[LinFusion] distributed {self.what}: {why}") from None
            except RuntimeError as e:   # a peer closed its connection (it died) or the timeout passed
                raise DistributedFault(f"[LinFusion] distributed {self.what}: rank {self.rank} lost another rank "
                                       f"({str(e).splitlines()[0][:300]})") from e

    def start_call(self) -> None:
        """A new call: its counters reset; in a launched session, every rank at this call of the prompt or all of
        them cancel here, before any collective (Session.enter). DistributedFault if the session ended."""
        why = self._aborted()
        if why is not None:
            raise DistributedFault(f"[LinFusion] distributed {self.what}: the session ended earlier ({why})")
        self.last_sent, self.sent, self.waits = self.sent, {}, {}
        self.calls += 1
        self.reductions, self.cancelled = 0, False
        self.call_in_prompt = self.calls
        from . import distributed_session
        session = distributed_session.active()
        prompt_id = distributed_session.current_prompt_id() if session is not None else None
        if prompt_id is not None:
            # All ranks at this call of this prompt, or all cancel here (interrupted, or a rank left the prompt).
            # Prompts end differently on ranks only by a cancel, so the call's number in its prompt is the
            # number every rank agrees on (a cached Tiled UNet node keeps this partition across prompts).
            try:
                self.call_in_prompt = session.enter(prompt_id, self.what)
            except BaseException:
                self.cancelled = True
                raise

    def begin(self, x, timesteps, context, transformer_options):
        """Check that every rank is on the same call; raise DistributedMismatch on all of them if not."""
        self.start_call()
        self.latent_rows = x.shape[2]
        fp = fingerprint(self.call_in_prompt, x, timesteps, context, transformer_options).to(self.comm)
        every = [torch.empty_like(fp) for _ in range(self.world)]
        self._wait([self.dist.all_gather(every, fp, self.group, async_op=True)])
        self._count("check", fp)
        every = [e.cpu() for e in every]
        every = [e.view(torch.int64) for e in every]   # bits: a NaN equals itself
        bad = [k for k, e in enumerate(every) if not torch.equal(e, every[0])]
        if bad:
            fields = [name for i, name in enumerate(FINGERPRINT) if any(e[i] != every[0][i] for e in every)]
            raise DistributedMismatch(
                f"[LinFusion] distributed tiled UNet: rank(s) {bad} are not on rank 0's UNet call (differing: "
                f"{', '.join(fields)}); every rank must run the same prompt, seed and sampler in the same order")

    @contextlib.contextmanager
    def call(self):
        """Around one call: an error here is published, so the other ranks stop waiting for this one."""
        try:
            yield
            if self.pending:   # the call ended before a checkpoint took the cancel: ComfyUI's sampler will
                import comfy.model_management
                comfy.model_management.interrupt_current_processing(True)
                self.pending = False
        except DistributedMismatch:   # every rank raised it at the same point: the session can go on
            raise
        except BaseException as e:
            if self.cancelled:        # a cancel every rank took at the same checkpoint: the session goes on
                raise
            if self.store is not None and self._aborted() is None:   # the first fault's message stays
                with contextlib.suppress(Exception):
                    self.store.set(ABORT_KEY, f"rank {self.rank} failed: {type(e).__name__}: {e}"[:2000])
            raise


FINGERPRINT = ["call number", "x dims", "x shape[0]", "x shape[1]", "x shape[2]", "x shape[3]", "x sum",
               "x sum of squares", "x weighted sum", "timesteps", "sigma", "context shape", "context sum",
               "cond_or_uncond"]


def fingerprint(call, x, timesteps, context, to) -> torch.Tensor:
    xd = x.detach().double().reshape(-1)
    shape = list(x.shape) + [0] * (4 - x.ndim)
    ramp = torch.arange(1, xd.numel() + 1, dtype=torch.float64, device=xd.device).remainder_(9973)
    sig = to.get("sigmas")
    ctx = context if isinstance(context, torch.Tensor) else None
    vals = [call, x.ndim] + shape[:4] + [
        xd.sum().item(), xd.square().sum().item(), (xd * ramp).sum().item(),
        timesteps.double().sum().item() if isinstance(timesteps, torch.Tensor) else 0.0,
        sig.double().sum().item() if isinstance(sig, torch.Tensor) else 0.0,
        math.prod(ctx.shape) if ctx is not None else -1,
        ctx.double().sum().item() if ctx is not None else 0.0,
        sum((i + 1) * (v + 1) for i, v in enumerate(to.get("cond_or_uncond", [])))]
    return torch.tensor(vals, dtype=torch.float64)


def init_from_env(backend: str | None = None, timeout_s: float = 600.0):
    """torch.distributed from the environment torchrun sets (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE):
    NCCL where CUDA is available, gloo otherwise (CPU, or across machines without NCCL). Idempotent."""
    import torch.distributed as dist
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise RuntimeError(f"[LinFusion] distributed: {', '.join(missing)} not set (torchrun sets them)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()

"""One distributed session: N ComfyUIs started by the launcher (`scripts/comfy_host.py serve --gpus N`) that run
the same prompts, so the Tiled UNet's `Strips` partition can split every UNet call over them (and the tiled VAE
nodes' `VAEStrips` every decode and encode).

Inside each ComfyUI of a launch (the launcher sets LINFUSION_DISTRIBUTED=1 beside torchrun's variables):
- the process group is formed at load time (tiled_unet_distributed.init_from_env: NCCL on GPUs, gloo on CPUs);
- rank 0 is the ComfyUI the user sees. Its public on-prompt hook (PromptServer.add_on_prompt_handler) gives
  every queued prompt a prompt id and a sequence number and puts the JSON into the rendezvous store; each
  follower's session thread takes them in order and queues them through its own HTTP API (POST /prompt on
  127.0.0.1), with the same prompt id. Tensors never go this way: only torch.distributed carries them.
- a cancel: rank 0's session thread sees its interrupt flag (or its running prompt ending) and publishes the
  prompt id; followers interrupt that prompt through their own POST /interrupt (targeted by prompt id, so a
  late cancel cannot hit the next prompt). Inside the UNet, ranks stop together (see `enter` and Strips).
- every rank publishes the highest sequence number it has left (finished, failed, cancelled or rejected), so a
  rank waiting for the others at a UNet or VAE call learns that one of them will not come.

The rendezvous store here is a second client of the TCPStore torch.distributed already runs on rank 0
(MASTER_ADDR:MASTER_PORT): no port or transport of our own.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import uuid

log = logging.getLogger("LinFusion")

ENV = "LINFUSION_DISTRIBUTED"     # set to 1 by the launcher in every rank's environment
KEY = "linfusion/session/"
POLL_S = 0.02

_session = None


def active():
    """The session this ComfyUI joined at load time, or None (not started by the launcher)."""
    return _session


def interrupted() -> bool:
    import comfy.model_management
    return comfy.model_management.processing_interrupted()


def raise_interrupt():
    """ComfyUI's cancel, as throw_exception_if_processing_interrupted raises it (the flag is consumed)."""
    import comfy.model_management
    comfy.model_management.interrupt_current_processing(False)
    raise comfy.model_management.InterruptProcessingException()


def current_prompt_id():
    """The prompt the executor runs on this thread (None outside a prompt)."""
    from comfy_execution.utils import get_executing_context
    ctx = get_executing_context()
    return None if ctx is None else ctx.prompt_id


class Session:
    def __init__(self, rank: int, world: int, store, server, timeout_s: float):
        self.rank, self.world, self.server, self.timeout_s = rank, world, server, timeout_s
        self._store, self._lock = store, threading.Lock()
        self.seq_of = {}          # prompt id -> its place in rank 0's order (1, 2, ...)
        self.calls = {}           # prompt id -> distributed calls (tiled UNet, tiled VAE) entered in it
        self.cancelled_at = None  # (prompt id, call, checkpoint) of the last coordinated cancel, for logs/tests

    # ---------------------------------------------------------------- the store (one client, several threads)
    def _do(self, fn, *args):
        with self._lock:
            return fn(*args)

    def get(self, key):
        if not self._do(self._store.check, [KEY + key]):
            return None
        return self._do(self._store.get, KEY + key).decode()

    def set(self, key, value):
        self._do(self._store.set, KEY + key, str(value))

    def add(self, key, n=1) -> int:
        return self._do(self._store.add, KEY + key, n)

    def decide(self, key, value) -> str:
        """The first decision written for `key` wins; every rank reads the same one."""
        return self._do(self._store.compare_set, KEY + key, "", value).decode()

    # ---------------------------------------------------------------- rank 0: prompts out
    def on_prompt(self, json_data):
        """PromptServer's on-prompt hook on rank 0: the prompt goes to every follower, same id, in order."""
        if "prompt" not in json_data:
            return json_data
        json_data["prompt_id"] = str(json_data.get("prompt_id") or uuid.uuid4())
        seq = self.add("prompts")
        self.seq_of[json_data["prompt_id"]] = seq
        forward = {k: v for k, v in json_data.items() if k != "client_id"}   # no browser watches a follower
        self.set(f"prompt/{seq}", json.dumps(forward))
        return json_data

    # ---------------------------------------------------------------- every rank: one thread
    def serve_forever(self):
        running, announced, next_prompt, seen_cancels = set(), set(), 1, 0
        while True:
            try:
                if self.rank > 0:
                    while (text := self.get(f"prompt/{next_prompt}")) is not None:
                        self._queue_here(next_prompt, json.loads(text))
                        next_prompt += 1
                    n = self.add("cancels", 0)
                    for i in range(seen_cancels + 1, n + 1):
                        self._http("/interrupt", {"prompt_id": self.get(f"cancel/{i}")})
                    seen_cancels = n
                now = {item[1] for item in self.server.prompt_queue.get_current_queue()[0]}
                for pid in running - now:           # left: finished, failed or cancelled here
                    self._left(pid)
                    if self.rank == 0 and not self._succeeded(pid):
                        self._announce_cancel(pid, announced)   # followers still in it stop too
                if self.rank == 0 and interrupted():
                    for pid in now:
                        self._announce_cancel(pid, announced)
                running = now
            except Exception:   # the store went away (rank 0 ended) or a follower's HTTP hiccup: say so, go on
                log.exception("[LinFusion] distributed session thread (rank %d)", self.rank)
                time.sleep(1.0)
            time.sleep(POLL_S)

    def _announce_cancel(self, pid, announced):
        if pid in self.seq_of and pid not in announced:
            announced.add(pid)
            self.set(f"cancel/{self.add('cancels', 0) + 1}", pid)
            self.add("cancels")

    def _succeeded(self, pid) -> bool:
        entry = self.server.prompt_queue.get_history(prompt_id=pid).get(pid) or {}
        return (entry.get("status") or {}).get("status_str") == "success"

    def _left(self, pid):
        seq = self.seq_of.get(pid)
        if seq is not None and seq > int(self.get(f"left/{self.rank}") or 0):
            self.set(f"left/{self.rank}", seq)

    def _queue_here(self, seq, body):
        self.seq_of[body["prompt_id"]] = seq
        status, answer = self._http("/prompt", body)
        if status != 200:
            log.error("[LinFusion] distributed rank %d: rank 0's prompt %s was refused here (%s): %s", self.rank,
                      body["prompt_id"], status, answer[:2000])
            self._left(body["prompt_id"])

    def _http(self, path, body, attempts=600):
        """POST to this ComfyUI's own HTTP API (it may still be starting: wait for it)."""
        from comfy.cli_args import args
        host = args.listen.split(",")[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        req = urllib.request.Request(f"http://{host}:{args.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        for _ in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, r.read().decode(errors="replace")
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(errors="replace")
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"[LinFusion] distributed rank {self.rank}: its own ComfyUI never answered on "
                           f"{host}:{args.port}")

    # ---------------------------------------------------------------- the prompt worker: one distributed call
    def enter(self, prompt_id, what: str = "tiled UNet") -> int:
        """Wait until every rank is at this distributed call (a tiled UNet call, a tiled VAE decode or encode of
        one image: `what`) of `prompt_id`; its number in the prompt (1, 2, ...: UNet and VAE calls counted
        together, in the order every rank runs them).

        A decision per call, written once in the store (compare-and-set) and read by all: rank 0 writes "go"
        when all ranks have arrived; any rank writes "cancel" when it was interrupted or another rank has left
        the prompt. On cancel every rank raises ComfyUI's InterruptProcessingException here, before any
        collective of the call, so the process group stays in step for the next prompt."""
        seq = self.seq_of.get(prompt_id)
        if seq is None:
            raise RuntimeError(f"[LinFusion] distributed {what}: prompt {prompt_id} did not come through rank "
                               f"0's queue (POST /prompt on rank 0), so the other ranks do not run it")
        call = self.calls[prompt_id] = self.calls.get(prompt_id, 0) + 1
        key = f"call/{seq}/{call}"
        self.add(key + "/arrived")
        deadline = time.monotonic() + self.timeout_s
        while True:
            decision = self.get(key + "/decision")
            if decision is None:
                why = self._why_cancel(seq)
                if why:
                    decision = self.decide(key + "/decision", "cancel: " + why)
                elif self.rank == 0 and self.add(key + "/arrived", 0) >= self.world:
                    decision = self.decide(key + "/decision", "go")
                elif time.monotonic() > deadline:
                    decision = self.decide(key + "/decision", f"cancel: not every rank came in {self.timeout_s:.0f} s")
                else:
                    time.sleep(0.002)
                    continue
            if decision == "go":
                return call
            self.cancel(prompt_id, call, f"before the call ({decision[len('cancel: '):]})", what)

    def _why_cancel(self, seq):
        if interrupted():
            return f"rank {self.rank} was interrupted"
        for k in range(self.world):
            if k != self.rank and int(self.get(f"left/{k}") or 0) >= seq:
                return f"rank {k} left the prompt"
        return None

    def cancel(self, prompt_id, call, where, what: str = "tiled UNet"):
        """Every rank at the same checkpoint: stop this prompt as ComfyUI's cancel does."""
        self.cancelled_at = (prompt_id, call, where)
        log.warning("[LinFusion] distributed rank %d: cancelled at distributed call %d of prompt %s (%s), %s",
                    self.rank, call, prompt_id, what, where)
        raise_interrupt()


def require(node: str, work: str) -> Session:
    """The launcher's session for a node whose 'distributed' switch is on; without the launcher an error, not a
    quiet single-process run: the switch asks for several processes, and a user who sees the result come out of
    one would believe the others worked."""
    if _session is None:
        raise RuntimeError(
            f"[LinFusion] {node}: 'distributed' is on, but this ComfyUI was not started by the launcher, so there "
            f"are no other ranks to split {work} over. Start ComfyUI with `python3 scripts/comfy_host.py serve "
            f"--gpus N` (one process per GPU; --ranks/--rank/--master across machines), or switch 'distributed' "
            f"off.")
    return _session


def join_launcher():
    """Join the launcher's process group (only where the launcher started this ComfyUI); idempotent."""
    global _session
    if _session is not None or os.environ.get(ENV) != "1":
        return _session
    import torch.distributed as dist
    import comfy.model_management
    from server import PromptServer

    from .tiled_unet_distributed import init_from_env
    timeout_s = float(os.environ.get("LINFUSION_DISTRIBUTED_TIMEOUT", "600"))
    backend = "nccl" if comfy.model_management.get_torch_device().type == "cuda" else "gloo"
    rank, world = init_from_env(backend, timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    server = PromptServer.instance
    _session = Session(rank, world, store, server, timeout_s)
    if rank == 0:
        server.add_on_prompt_handler(_session.on_prompt)
    threading.Thread(target=_session.serve_forever, daemon=True, name="linfusion-distributed-session").start()
    log.info("[LinFusion] distributed: rank %d of %d (%s); %s", rank, world, backend,
             "serving the UI" if rank == 0 else "runs rank 0's prompts")
    return _session

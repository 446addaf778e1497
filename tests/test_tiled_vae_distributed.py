"""The distributed exact tiled VAE (linfusion_core/tiling/tiled_vae_distributed.py) on the CPU: gloo, 2 and 3 ranks.

Each rank is a process started as torchrun starts one (env:// on a free port of 127.0.0.1, one thread each,
tests/distributed_vae_rank.py); one launch per world size runs its whole plan, the tests read what the ranks
wrote. The VAEs are ComfyUI's own AutoencoderKL with random weights (tests/random_vae.py). References, on rank 0
with the same thread count: the single-process tiled VAE (bitwise: the same tiles, kernels and statistics order)
and ComfyUI's untiled decode / encode (the tiled VAE's own bound, tests/test_tiled_vae.py).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from distributed_vae_rank import launch

FP32_TOL = 1e-4     # tests/test_tiled_vae.py's bound against the untiled VAE (decoder output in [-1, 1])
ALIGNED_REL = 1e-5  # the aligned mode against the single-process tiled VAE: fp32 rounding, relative

TWO = [
    dict(kind="decode", name="small", config="small", h=16, w=24, tile=40, image=True),
    dict(kind="decode", name="odd_uneven", config="tiny", h=9, w=7, tile=24, weights=[2, 1]),
    dict(kind="decode", name="aligned", config="tiny", h=11, w=10, tile=24, aligned=True),
    dict(kind="encode", name="encode", config="tiny", h=72, w=56, tile=24),
    dict(kind="mismatch", name="mismatch"),
    dict(kind="cancel", name="cancel", config="tiny", h=12, w=10, tile=24, cancel_at=2),
    dict(kind="fault", name="raise", config="tiny", h=8, w=8, tile=24, rank=1),
]
THREE = [
    dict(kind="decode", name="odd", config="tiny", h=13, w=10, tile=24),
    # 6 latent rows: strips of 2 rows at the latent, 16 at the output; the mid block's one tile row on rank 0
    dict(kind="decode", name="thin", config="small", h=6, w=20, tile=24, b=2),
    dict(kind="encode", name="encode", config="tiny", h=88, w=40, tile=32),
    dict(kind="fault", name="raise_rank0", config="tiny", h=8, w=8, tile=24, rank=0),
]
PLANS = {2: TWO, 3: THREE}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world size -> {step name: [what each rank wrote]} (launched once per world size, on first use)."""
    done = {}

    def get(world):
        if world not in done:
            assert os.environ.get("COMFYUI_PATH"), "COMFYUI_PATH names the ComfyUI the ranks import " \
                                                   "(scripts/comfy_host.py sets it)"
            out = tmp_path_factory.mktemp(f"distributed_vae{world}")
            started = time.perf_counter()
            results = launch(world, {"timeout_s": 20, "steps": PLANS[world]}, out, timeout_s=240)
            crashed = [r for r in results if r["rc"] != 0]
            assert not crashed, "a rank failed:\n" + "\n".join(f"rank {r['rank']} rc {r['rc']}:\n{r['log']}"
                                                              for r in crashed)
            print(f"{world} ranks: {time.perf_counter() - started:.1f} s")
            done[world] = {s["name"]: [_load(out / f"{s['name']}.rank{k}.pt") for k in range(world)]
                           for s in PLANS[world]}
        return done[world]
    return get


def _load(path):
    return torch.load(path, weights_only=False) if path.exists() else None


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _rel_err(a, b):
    return _max_err(a, b) / b.abs().max().item()


@pytest.mark.parametrize("world,name,bitwise", [
    (2, "small", True), (2, "odd_uneven", True), (2, "aligned", False), (2, "encode", True),
    (3, "odd", True), (3, "thin", True), (3, "encode", True)])
def test_distributed_vae_equals_single_process(ranks, world, name, bitwise):
    """Every rank returns the whole result: bitwise the single-process tiled VAE (aligned: to fp32 rounding),
    and within the tiled VAE's bound of ComfyUI's untiled decode / encode. The work was split: in the default
    mode every tile of the single process ran on exactly one rank."""
    rows = ranks(world)[name]
    ref, untiled = rows[0]["tiled"], rows[0]["untiled"]
    assert untiled.abs().max() > 0.5                       # the random VAE gives a real signal
    for k, r in enumerate(rows):
        assert r["out"].shape == untiled.shape
        if bitwise:
            assert torch.equal(r["out"], ref), f"rank {k}: not bitwise the single-process tiled VAE " \
                                               f"(max rel err {_rel_err(r['out'], ref):.2e})"
        else:
            assert _rel_err(r["out"], ref) <= ALIGNED_REL, f"rank {k}: {_rel_err(r['out'], ref):.2e}"
        assert _max_err(r["out"], untiled) <= FP32_TOL, f"rank {k}: {_max_err(r['out'], untiled):.2e} from ComfyUI's"
        done, total = r["ticks"][-1]
        assert done == total < rows[0]["local_total"], f"rank {k}: {total} tiles of {rows[0]['local_total']}"
        assert r["sent"].get("reduce", 0) > 0          # every rank passes on or broadcasts the statistics
    totals = [r["ticks"][-1][1] for r in rows]
    if bitwise:
        assert sum(totals) == rows[0]["local_total"], f"tiles per rank {totals}"
    # halos moved, and the output was gathered (a small output, the encoder's latent, may have one owner)
    assert sum(r["sent"].get("rows", 0) for r in rows) > 0 and sum(r["sent"].get("output", 0) for r in rows) > 0


def test_distributed_vae_mid_attention_gathers_keys_and_image_matches_vae_decode(ranks):
    """The mid block's softmax attention sees every key: the ranks exchanged keys (the query tiles of this
    latent are split over both ranks), and the IMAGE equals ComfyUI's VAE.decode within the tiled VAE's bound."""
    rows = ranks(2)["small"]
    assert sum(r["sent"].get("keys", 0) for r in rows) > 0
    for k, r in enumerate(rows):
        assert r["image"].shape == rows[0]["comfy_image"].shape == (1, 128, 192, 3)
        assert _max_err(r["image"], rows[0]["comfy_image"]) <= FP32_TOL, f"rank {k}"


def test_distributed_vae_mismatch_raises_on_every_rank(ranks):
    for k, r in enumerate(ranks(2)["mismatch"]):
        assert r["raised"] == "DistributedMismatch", f"rank {k}: {r}"
        assert "tiled VAE" in r["message"] and "x sum" in r["message"]


def test_distributed_vae_cancel_stops_every_rank_together_and_the_next_prompt_runs(ranks):
    """Under a launched session (distributed_session.Session on the group's store): rank 0 cancelled between two
    of its tiles stops every rank after the same reduction (ComfyUI's per-op cancel inside rank 0's next
    convolution is held until then, not raised there); rank 0 interrupted before a call stops every rank at that
    call's go/cancel decision; the process group is still in step, and the next prompt's decode is bitwise the
    single-process tiled VAE on both ranks. No cancel leaks into the next prompt."""
    rows = ranks(2)["cancel"]
    for k, r in enumerate(rows):
        inside, before, after = r["inside"], r["before"], r["next"]
        assert inside["raised"] == "InterruptProcessingException", f"rank {k}: {inside}"
        assert inside["at"] == rows[0]["inside"]["at"], f"rank {k} stopped at {inside['at']}, rank 0 at " \
                                                        f"{rows[0]['inside']['at']}"
        assert before["raised"] == "InterruptProcessingException", f"rank {k}: {before}"
        assert before["at"] == ("p1", 2, "before the call (rank 0 was interrupted)"), f"rank {k}: {before['at']}"
        assert before["reductions"] == 0                     # nothing exchanged in the cancelled call
        assert after["raised"] is None, f"rank {k}: {after}"
        assert torch.equal(after["out"], rows[0]["tiled"]), f"rank {k}: the next prompt's decode differs"
        assert not (inside["flag_after"] or before["flag_after"] or after["flag_after"])
    prompt, call, where = rows[0]["inside"]["at"]
    fired = rows[0]["inside"]["fired"][0]
    print(f"cancel set after reduction {fired}, every rank stopped {where}")
    assert (prompt, call) == ("p1", 1) and where == f"after reduction {fired + 1}"


@pytest.mark.parametrize("world,name", [(2, "raise"), (3, "raise_rank0")])
def test_distributed_vae_fault_stops_every_rank(ranks, world, name):
    """One rank raises inside a decoder convolution (rank 0, which hosts the rendezvous store, in the 3-rank
    plan): the others raise DistributedFault naming it, long before the process group's 20 s timeout."""
    rows = ranks(world)[name]
    bad = next(s for s in PLANS[world] if s["name"] == name)["rank"]
    assert rows[bad]["raised"] == "RuntimeError"
    failed_at = rows[bad]["failed_at"]
    for k, r in enumerate(rows):
        if k == bad:
            continue
        assert r["raised"] == "DistributedFault", f"rank {k}: {r}"
        print(f"{name}: rank {k} raised {r['raised_at'] - failed_at:.2f} s after rank {bad} failed: {r['message']}")
        assert r["raised_at"] - failed_at < 10, f"rank {k} took {r['raised_at'] - failed_at:.1f} s"
        assert f"rank {bad} failed: RuntimeError: injected fault" in r["message"]
        assert "distributed tiled VAE" in r["message"]

"""The distributed tiled UNet (linfusion_core/tiling/tiled_unet_distributed.py) on the CPU: gloo, 2 and 3 ranks.

Each rank is a process of its own started as torchrun starts one (env:// rendezvous on a free port of 127.0.0.1,
tests/distributed_rank.py), one thread each. One launch per world size runs every step of its plan in order;
the tests below read what the ranks wrote. Compared with rank 0's single-process references computed with
the same thread count: the tiled runner (bitwise: the same tiles, the same kernels, the same fold order) and
the untiled UNet (<= 1e-5 relative, fp32).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from distributed_rank import launch
from tiled_unet_models import rel_err

EXACT = 1e-5   # the bound against the untiled UNet, fp32

TWO = [
    dict(kind="forward", name="sd15", family="sd15", h=36, w=28, tile=10),           # odd deepest sizes
    dict(kind="forward", name="sdxl_aligned", family="sdxl", h=37, w=27, tile=12, aligned=True),
    dict(kind="forward", name="cast_uneven", family="sd15_cast", h=35, w=22, tile=8, weights=[2, 1]),
    dict(kind="sample", name="sampler", family="sd15", h=24, w=16, tile=8, steps=3),
    dict(kind="mismatch", name="mismatch"),
    dict(kind="fault", name="raise", family="sd15", h=20, w=20, tile=8, rank=1, how="raise"),
]
THREE = [
    # 12 latent rows: the deepest level has 3, one per rank (strips of 1 row; tiles of 4 rows: 2 ranks idle there)
    dict(kind="forward", name="thin", family="sd15", h=12, w=20, tile=6, b=1),
    dict(kind="forward", name="sdxl", family="sdxl", h=37, w=27, tile=12),
    dict(kind="forward", name="sd15_aligned", family="sd15", h=36, w=28, tile=10, aligned=True),
    dict(kind="fault", name="exit", family="sd15", h=20, w=20, tile=8, rank=2, how="exit"),
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
            out = tmp_path_factory.mktemp(f"distributed{world}")
            started = time.perf_counter()
            results = launch(world, {"timeout_s": 20, "steps": PLANS[world]}, out, timeout_s=240)
            exits = {s["rank"]: 17 for s in PLANS[world] if s.get("how") == "exit"}   # os._exit(17), on purpose
            crashed = [r for r in results if r["rc"] != exits.get(r["rank"], 0)]
            assert not crashed, "a rank failed:\n" + "\n".join(f"rank {r['rank']} rc {r['rc']}:\n{r['log']}"
                                                              for r in crashed)
            print(f"{world} ranks: {time.perf_counter() - started:.1f} s")
            done[world] = {s["name"]: [_load(out / f"{s['name']}.rank{k}.pt") for k in range(world)]
                           for s in PLANS[world]}
        return done[world]
    return get


def _load(path):
    return torch.load(path, weights_only=False) if path.exists() else None


def _forward_checks(rows, bitwise):
    ref, untiled = rows[0]["tiled"], rows[0]["untiled_ref"]
    for k, r in enumerate(rows):
        assert r["out"].shape == untiled.shape
        if bitwise:
            assert torch.equal(r["out"], ref), f"rank {k}: not bitwise the single-process tiled UNet " \
                                               f"(max rel err {rel_err(r['out'], ref):.2e})"
        assert rel_err(r["out"], untiled) <= EXACT, f"rank {k}: {rel_err(r['out'], untiled):.2e} from the untiled UNet"
        # the work was split: each rank ran fewer tile steps than the single process, and exchanged rows and parts
        assert r["ticks"] < rows[0]["local_ticks"]
        assert r["sent"].get("rows", 0) > 0 and r["sent"].get("reduce", 0) > 0


@pytest.mark.parametrize("world,name,bitwise", [
    (2, "sd15", True), (2, "cast_uneven", True), (2, "sdxl_aligned", False),
    (3, "thin", True), (3, "sdxl", True), (3, "sd15_aligned", False)])
def test_distributed_forward_equals_single_process(ranks, world, name, bitwise):
    _forward_checks(ranks(world)[name], bitwise)


def test_distributed_untiled_layer_is_gathered_and_named(ranks):
    """SD1.5's middle block keeps softmax self-attention: every rank gathers its input and runs it, and says so."""
    rows = ranks(2)["sd15"]
    for r in rows:
        assert r["untiled"] == [(("middle", 0), "BasicTransformerBlock: softmax self-attention")]
        assert r["sent"].get("gather", 0) > 0


def test_distributed_sampler_keeps_identical_latents(ranks):
    """ComfyUI's sampler (3 euler steps, CFG) through the Tiled UNet wrapper on each rank: the same latent on
    every rank, bitwise the single-process tiled sampler's, within 1e-5 of the untiled one."""
    rows = ranks(2)["sampler"]
    ref, untiled = rows[0]["tiled"], rows[0]["untiled_ref"]
    for r in rows:
        assert r["calls"] == 3
        assert torch.equal(r["out"], ref)
        assert rel_err(r["out"], untiled) <= EXACT


def test_distributed_call_mismatch_raises_on_every_rank(ranks):
    for k, r in enumerate(ranks(2)["mismatch"]):
        assert r["raised"] == "DistributedMismatch", f"rank {k}: {r}"
        assert "x sum" in r["message"]


@pytest.mark.parametrize("world,name", [(2, "raise"), (3, "exit")])
def test_distributed_fault_stops_every_rank(ranks, world, name):
    """One rank raises inside a layer (2 ranks) or its process exits (3 ranks): the others raise
    DistributedFault naming it, long before the process group's 20 s timeout."""
    rows = ranks(world)[name]
    bad = next(s for s in PLANS[world] if s["name"] == name)["rank"]
    failed_at = rows[bad]["failed_at"]
    for k, r in enumerate(rows):
        if k == bad:
            continue
        assert r["raised"] == "DistributedFault", f"rank {k}: {r}"
        print(f"{name}: rank {k} raised {r['raised_at'] - failed_at:.2f} s after rank {bad} failed: {r['message']}")
        assert r["raised_at"] - failed_at < 10, f"rank {k} took {r['raised_at'] - failed_at:.1f} s"
        if name == "raise":
            assert f"rank {bad} failed: RuntimeError: injected fault" in r["message"]

"""Exact tiled VAE: tiled decode/encode equal the untiled ComfyUI VAE up to float rounding.

Real ComfyUI AutoencoderKL (comfy.sd.VAE from a random variance-preserving state dict), CPU, small
images. Tile sizes include ones that do not divide the image, and non-square / odd-sized latents.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from random_vae import SD_DDCONFIG, SMALL_DDCONFIG, TINY_DDCONFIG, load_vae, random_vae_state_dict

FP32_TOL = 1e-4          # on the decoder's [-1, 1] output / the latent mean


@pytest.fixture(scope="module")
def tv(host):
    return importlib.import_module(host.extension_module.__name__ + ".linfusion_core.tiling.tiled_vae")


@pytest.fixture(scope="module")
def small_sd(host):
    return random_vae_state_dict(SMALL_DDCONFIG, seed=1)


@pytest.fixture(scope="module")
def small_vae(small_sd):
    return load_vae(small_sd, SMALL_DDCONFIG, dtype=torch.float32)


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def untiled(small_vae, latent):
    with torch.no_grad():
        return small_vae.first_stage_model.decode(latent).float()


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# -- the building blocks against their plain formulas ------------------------------------------------
def test_group_stats_merge_equals_group_norm(host):
    from importlib import import_module
    gns = import_module(host.extension_module.__name__ + ".linfusion_core.tiling.group_norm_stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 23, 37, generator=g) * 3 + 5       # offset mean: catches a naive E[x^2]-E[x]^2
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    stats = gns.ChannelStats(64, "cpu")
    for y0, y1 in ((0, 5), (5, 23)):
        for x0, x1 in ((0, 11), (11, 30), (30, 37)):
            stats.update(x[:, :, y0:y1, x0:x1])
    assert stats.count == 23 * 37
    ours = gns.apply_group_norm(x, stats, norm, silu=True)
    ref = torch.nn.functional.silu(norm(x))
    assert _max_err(ours, ref) < 1e-5


def test_online_softmax_attention_equals_softmax(host):
    from importlib import import_module
    att = import_module(host.extension_module.__name__ + ".linfusion_core.tiling.vae_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(150, 32, generator=g) * 3 for _ in range(3))   # peaked softmax
    chunks = [(k[s:s + 37], v[s:s + 37]) for s in range(0, 150, 37)]
    ours = att.online_softmax_attention(q, chunks, 32 ** -0.5, query_chunk=40)
    ref = att.attention_reference(q.double(), k.double(), v.double(), 32 ** -0.5)
    assert _max_err(ours, ref) < 2e-5 * ref.abs().max().item()      # fp32 rounding, relative


# -- decode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [24, 40, 72])      # 40, 72 do not divide 128 x 192; 24 < every level's size
def test_decode_matches_untiled_fp32(tv, small_vae, latent, untiled, tile):
    out = tv.decode_raw(small_vae, latent, tile_size=tile, park="cpu")
    assert out.shape == untiled.shape
    assert _max_err(out, untiled) <= FP32_TOL


def test_decode_odd_latent_batch_and_accelerator_park(tv, small_vae):
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(3))   # odd, non-square, batch 2
    with torch.no_grad():
        ref = small_vae.first_stage_model.decode(z).float()
    out = tv.decode_raw(small_vae, z, tile_size=32, park="accelerator")
    assert out.shape == ref.shape == (2, 3, 72, 56)
    assert _max_err(out, ref) <= FP32_TOL


def test_decode_full_size_sd_vae_detected_from_file_layout(tv, host):
    # The full SD VAE (ch 128), detected by comfy.sd.VAE like a VAE file: the architecture users load.
    vae = load_vae(random_vae_state_dict(SD_DDCONFIG, seed=4), dtype=torch.float32)
    assert tv.unsupported_reason(vae) is None
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.first_stage_model.decode(z).float()
    assert ref.std() > 0.1                              # the random VAE produces a real signal
    image = tv.decode(vae, z, tile_size=48)
    assert _max_err(image, vae.decode(z)) <= FP32_TOL    # after process_output, same as VAE.decode
    assert _max_err(tv.decode_raw(vae, z, tile_size=48), ref) <= FP32_TOL


def test_ours_beats_comfyui_tiled_decode(tv, small_vae, latent, untiled):
    # ComfyUI's VAEDecodeTiled with small tiles (64 px, overlap 16 px): blended independent tiles.
    theirs = small_vae.decode_tiled(latent, tile_x=8, tile_y=8, overlap=2).movedim(-1, 1)
    truth = small_vae.process_output(untiled.clone())    # works in place since ComfyUI 0.3.76; untiled is shared
    ours = small_vae.process_output(tv.decode_raw(small_vae, latent, tile_size=64))
    err_theirs, err_ours = _max_err(theirs, truth), _max_err(ours, truth)
    print(f"max |tiled - untiled| on [0, 1]: ComfyUI decode_tiled {err_theirs:.4f}, LinFusion {err_ours:.2e}")
    assert err_ours < 1e-4 < err_theirs
    assert err_ours * 100 < err_theirs


@pytest.fixture(scope="module")
def tiny_sd(host):
    return random_vae_state_dict(TINY_DDCONFIG, seed=10)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_decode_half_precision(tv, tiny_sd, dtype, tol):
    """Half precision: tiled and untiled differ only by rounding. Stated tolerance on the [-1, 1] output:
    bf16 0.15, fp16 0.02 (each layer rounds in a different order); and ours is no further from the fp32
    decode than ComfyUI's untiled half decode is (plus the same margin)."""
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref_fp32 = load_vae(tiny_sd, TINY_DDCONFIG, dtype=torch.float32).first_stage_model.decode(z).float()
        vae = load_vae(tiny_sd, TINY_DDCONFIG, dtype=dtype)
        ref_half = vae.first_stage_model.decode(z.to(dtype)).float()
    out = tv.decode_raw(vae, z, tile_size=24)
    assert torch.isfinite(out).all()
    err_vs_half = _max_err(out, ref_half)
    err_vs_fp32, half_vs_fp32 = _max_err(out, ref_fp32), _max_err(ref_half, ref_fp32)
    print(f"{dtype}: tiled vs untiled {err_vs_half:.4f}; vs fp32: tiled {err_vs_fp32:.4f}, untiled {half_vs_fp32:.4f}")
    assert err_vs_half <= tol
    assert err_vs_fp32 <= half_vs_fp32 + tol


class _LargestNewTensor:
    """Largest tensor any aten op allocates (views, in-place writes and torch.empty buffers excluded)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        outer = self
        self.largest = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.__name__.startswith("empty"):
                    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                              if isinstance(t, torch.Tensor)}
                    for t in tree_leaves(out):
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                            outer.largest = max(outer.largest, t.numel())
                return out
        self.mode = Mode()


def test_working_memory_is_bounded_by_the_tile_not_the_image(tv, tiny_sd):
    """Parked whole activations aside (the park buffers), every tensor computed during a decode is the
    same size for a 4x larger image: working memory depends on the tile size only."""
    vae = load_vae(tiny_sd, TINY_DDCONFIG, dtype=torch.float32)
    largest = {}
    for h, w in ((8, 8), (16, 16)):
        z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(12))
        passes = tv._passes(vae, 16, "cpu", None, dry=False)
        probe = _LargestNewTensor()
        with torch.no_grad(), probe.mode:
            out = tv._walk_decoder(passes, vae.first_stage_model.decoder, passes.park(z, with_stats=False), "cpu")
        assert out.tensor.shape[-2:] == (8 * h, 8 * w)
        largest[(h, w)] = probe.largest
    full_activation = 32 * 128 * 128                 # one full-resolution activation of the larger image
    assert largest[(16, 16)] == largest[(8, 8)] < full_activation / 8


# -- encode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [24, 56])
def test_encode_matches_untiled_fp32(tv, small_vae, tile):
    x = torch.rand(1, 3, 72, 112, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        ref = small_vae.first_stage_model.encode(x).float()       # the posterior mode, as VAE.encode
    out = tv.encode_raw(small_vae, x, tile_size=tile)
    assert out.shape == ref.shape == (1, 4, 9, 14)
    assert ref.abs().max() > 0.5
    assert _max_err(out, ref) <= FP32_TOL


def test_encode_image_like_vae_encode(tv, small_vae):
    # An IMAGE whose size is not a multiple of 8 is cropped exactly as VAE.encode crops it.
    image = torch.rand(1, 61, 43, 3, generator=torch.Generator().manual_seed(7))
    ref = small_vae.encode(image)
    out = tv.encode(small_vae, image, tile_size=32)
    assert out.shape == ref.shape == (1, 4, 7, 5)
    assert _max_err(out, ref) <= FP32_TOL


# -- robustness --------------------------------------------------------------------------------------
def test_interrupt_mid_decode_leaves_vae_usable(tv, small_vae, latent, untiled):
    import comfy.model_management as mm

    before = {k: v.clone() for k, v in small_vae.first_stage_model.state_dict().items()}
    seen = []

    def interrupt_after_some(done, total):
        seen.append((done, total))
        if done == total // 2:
            mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        tv.decode_raw(small_vae, latent, tile_size=64, on_progress=interrupt_after_some)
    assert seen[-1][0] == seen[-1][1] // 2                 # stopped at the next tile, not at the end
    assert not mm.processing_interrupted()
    after = small_vae.first_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _max_err(tv.decode_raw(small_vae, latent, tile_size=64), untiled) <= FP32_TOL


def test_bad_park_device_is_a_clear_error(tv, small_vae, latent):
    with pytest.raises(ValueError, match="park device"):
        tv.decode_raw(small_vae, latent, tile_size=64, park="gpu0")


def test_other_vae_runs_untiled_when_it_fits_with_a_note(host, tv):
    """TAESD is not an AutoencoderKL: the node runs it untiled (exact, it fits), never ComfyUI's blended
    tiles, and says so."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in taesd.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, math.prod(p.shape[1:]))))
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    assert "not an AutoencoderKL" in tv.unsupported_reason(vae)
    node = host.nodes.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    z = torch.randn(1, 4, 8, 8, generator=g)
    out = node.decode({"samples": z}, vae, 64, "cpu")
    assert "ran the untiled VAE instead" in out["ui"]["text"][0]
    assert out["result"][0].shape == (1, 64, 64, 3)
    assert _max_err(out["result"][0], vae.decode(z)) <= 1e-6


@pytest.fixture(scope="module")
def swapped_vae(small_sd):
    """The real ComfyUI AutoencoderKL with one decoder convolution swapped for a reflect-padded one (same
    weights): a layer the exact passes cannot tile. Encoder untouched."""
    vae = load_vae(small_sd, SMALL_DDCONFIG, dtype=torch.float32)
    block = vae.first_stage_model.decoder.up[1].block[0]
    old = block.conv1
    new = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
    block.conv1 = new
    return vae


def test_unsupported_layer_is_found_before_any_pass_and_named(tv, swapped_vae, latent, untiled):
    reason = tv.unsupported_reason(swapped_vae)
    assert reason == "layer decoder.up.1.block.0.conv1: padding_mode 'reflect'"
    ticks = []
    images, note = tv.decode_or_fallback(swapped_vae, latent, 32, on_progress=lambda d, t: ticks.append((d, t)))
    assert "decoder.up.1.block.0.conv1" in note and "untiled" in note
    assert ticks == [(1, 1)]                                   # one untiled image, no tiled pass started
    assert _max_err(images, swapped_vae.decode(latent)) <= 1e-6
    assert _max_err(images, swapped_vae.process_output(untiled.clone()).movedim(1, -1)) > 1e-3   # the swap matters
    # The ladder never takes ComfyUI's inexact tiles: where the untiled VAE would not fit (a latent shape only
    # measured by ComfyUI's estimate, never allocated), it says what to change instead.
    huge = (1, 4, 8, 1 << 22)
    assert tv.untiled_memory(swapped_vae, huge, "decode") > tv.available_memory(swapped_vae)
    with pytest.raises(RuntimeError, match="would need .* Use an SD1.x / SD2.x / SDXL VAE"):
        tv._fallback(swapped_vae, "decode", huge, reason, None, None, inexact_ok=False)


def test_encode_node_falls_back_to_the_untiled_encode(host, tv, swapped_vae):
    """The encode fallback path: the swapped VAE through the encode node equals VAE Encode, with a note."""
    image = torch.rand(1, 72, 112, 3, generator=torch.Generator().manual_seed(13))
    node = host.nodes.NODE_CLASS_MAPPINGS["LinFusionVAEEncodeTiled"]()
    out = node.encode(image, swapped_vae, 32, "cpu")
    assert "decoder.up.1.block.0.conv1" in out["ui"]["text"][0] and "untiled" in out["ui"]["text"][0]
    latent = out["result"][0]["samples"]
    assert latent.shape == (1, 4, 9, 14)
    assert _max_err(latent, swapped_vae.encode(image)) <= 1e-6


# -- through the real ComfyUI executor ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_file(host):
    """A full-size random SD VAE saved in the host's `vae` model folder (fp16 to keep the file small)."""
    import comfy.utils
    import folder_paths
    from conftest import MODEL_ROOT

    name = "linfusion_test_vae.safetensors"
    path = MODEL_ROOT / "vae" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.half() for k, v in random_vae_state_dict(SD_DDCONFIG, seed=9).items()}
        tmp = path.with_suffix(".tmp")
        comfy.utils.save_torch_file(sd, str(tmp))
        tmp.rename(path)
    folder_paths.filename_list_cache.clear()
    assert name in folder_paths.get_filename_list("vae")
    return name


def test_nodes_through_host_match_core_vae_nodes(host, vae_file, every_progress_update):
    image = {"class_type": "ImageCompositeMasked",       # a blue box on red: edges and flat areas
             "inputs": {"destination": ["red", 0], "source": ["blue", 0], "x": 20, "y": 16, "resize_source": False}}
    prompt = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae_file}},
        "red": {"class_type": "EmptyImage", "inputs": {"width": 88, "height": 64, "batch_size": 1, "color": 0xCC2211}},
        "blue": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 1, "color": 0x2244EE}},
        "img": image,
        "enc": {"class_type": "LinFusionVAEEncodeTiled",
                "inputs": {"pixels": ["img", 0], "vae": ["vae", 0], "tile_size": 32, "park_device": "cpu"}},
        "enc_ref": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0]}},
        "dec": {"class_type": "LinFusionVAEDecodeTiled",
                "inputs": {"samples": ["enc", 0], "vae": ["vae", 0], "tile_size": 48, "park_device": "cpu"}},
        "dec_ref": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["vae", 0]}},
        "cap_enc": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["enc", 0]}},
        "cap_enc_ref": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["enc_ref", 0]}},
        "cap_dec": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["dec", 0]}},
        "cap_dec_ref": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["dec_ref", 0]}},
    }
    result = host.run(prompt)
    c = result.captured
    assert _max_err(c["cap_enc"]["samples"], c["cap_enc_ref"]["samples"]) <= FP32_TOL
    assert c["cap_dec"].shape == c["cap_dec_ref"].shape == (1, 64, 88, 3)
    assert c["cap_dec_ref"].std() > 0.01
    assert _max_err(c["cap_dec"], c["cap_dec_ref"]) <= FP32_TOL
    for node_id in ("enc", "dec"):                        # a progress bar over tiles, run to its end
        ticks = [(v, t) for n, v, t in result.progress if n == node_id]
        assert len(ticks) > 10 and ticks[-1][0] == ticks[-1][1]

"""Low-memory mode changes memory only: the sampled latents match normal mode (fp32, tolerance 1e-5 relative to
the latent scale), and every patch is gone once the model is unloaded."""
import importlib

import pytest
import torch

TOLERANCE = 1e-5  # fp32; batch-1 vs batch-2 and chunked matmuls round differently, nothing else may differ


@pytest.fixture(scope="module")
def lm(core):
    return importlib.import_module(core.__name__ + ".low_memory")


@pytest.fixture(scope="module")
def hm(host):
    import highres_models
    return highres_models


def ksample(model, latent, hm, positive=None, negative=None, steps=3):
    import nodes
    positive = positive or hm.conditioning(10)
    negative = negative or hm.conditioning(11)
    return nodes.common_ksampler(model, 5, steps, 5.0, "euler", "normal", positive, negative,
                                 {"samples": latent}, denoise=1.0)[0]["samples"]


def low_memory(model, **overrides):
    import nodes
    options = dict(sequential_cond=True, ff_chunk_tokens=48, inplace_silu=True, park_skips=True,
                   attention_chunk_tokens=1024)
    options.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LinFusionLowMemory"]().patch(model, **options)[0]


def test_chunked_feed_forward_equals_the_plain_one(lm, hm):
    model = hm.unet_patcher(seed=20)
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    x = torch.randn(2, 200, 32)
    chunked = lm.ChunkedFeedForward(block.ff, 48)
    assert torch.allclose(chunked(x), block.ff(x), atol=1e-6, rtol=1e-6)
    assert chunked.state_dict().keys() == block.ff.state_dict().keys()  # LoRA keys unchanged
    assert chunked.net is block.ff.net


def test_low_memory_matches_normal_mode(hm):
    import comfy.model_management

    model = hm.unet_patcher(seed=21)
    before = hm.model_state(model)
    latent = torch.zeros(1, 4, 16, 24)
    batches, ff_calls = [], []
    unet = model.model.diffusion_model
    h1 = unet.input_blocks[0][0].register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    h2 = unet.input_blocks[1][1].transformer_blocks[0].ff.net.register_forward_pre_hook(
        lambda m, a: ff_calls.append(a[0].shape[1]))
    try:
        normal = ksample(model, latent, hm)
        normal_batches, normal_ff = batches[:], ff_calls[:]
        batches.clear(), ff_calls.clear()
        lowmem_model = low_memory(model)
        low = ksample(lowmem_model, latent, hm)
        # While the low-memory clone is loaded, its object patches are in the model.
        assert any(isinstance(m, torch.nn.SiLU) and m.inplace for m in unet.modules())
    finally:
        h1.remove(), h2.remove()
    assert normal_batches == [2, 2, 2] and batches == [1] * 6, "cond and uncond did not run one at a time"
    assert normal_ff == [384] * 3 and ff_calls == [48] * 8 * 6, "the feed-forward did not run in chunks"
    scale = normal.abs().max()
    assert torch.allclose(low, normal, atol=TOLERANCE * scale, rtol=0), (low - normal).abs().max()
    comfy.model_management.unload_all_models()
    hm.assert_same_state(before, hm.model_state(model))
    assert torch.equal(ksample(model, latent, hm), normal)


def test_low_memory_with_controlnet_matches_normal_mode(hm):
    import nodes

    model = hm.unet_patcher(seed=22)
    control = hm.tiny_controlnet(seed=23)
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(hm.conditioning(10), hm.conditioning(11), control,
                                                                 hint, 0.8, 0.0, 1.0)
    latent = torch.zeros(1, 4, 16, 16)
    normal = ksample(model, latent, hm, pos, neg)
    plain = ksample(model, latent, hm)
    assert not torch.allclose(normal, plain, atol=1e-3), "the ControlNet had no effect"
    low = ksample(low_memory(model), latent, hm, pos, neg)
    assert torch.allclose(low, normal, atol=TOLERANCE * normal.abs().max(), rtol=0)


def test_each_option_alone_matches(hm):
    model = hm.unet_patcher(seed=24)
    latent = torch.zeros(1, 4, 16, 16)
    normal = ksample(model, latent, hm, steps=2)
    for overrides in ({"sequential_cond": False, "ff_chunk_tokens": 0, "inplace_silu": False, "park_skips": False},
                      {"ff_chunk_tokens": 0, "inplace_silu": False, "park_skips": False},
                      {"sequential_cond": False, "inplace_silu": False, "park_skips": False},
                      {"sequential_cond": False, "ff_chunk_tokens": 0, "park_skips": False}):
        low = ksample(low_memory(model, **overrides), latent, hm, steps=2)
        assert torch.allclose(low, normal, atol=TOLERANCE * normal.abs().max(), rtol=0), overrides


def test_skip_parking_hands_the_device_copy_on(lm):
    parking = lm.SkipParking("meta")  # a device the tensors are not on: exercises the parking path on CPU
    options = {lm._PARK_FLAG: True}
    h = torch.randn(1, 4, 8, 8)
    parked = parking.park(h, options)
    assert parked.device.type == "meta"
    assert parking.resume(parked, options) is h          # no round trip for the next block
    other = torch.randn(1, 4, 8, 8)
    parking.park(h, options)
    assert parking.resume(other, options) is other       # a later patch replaced h: its result wins
    assert parking.park(h, {lm._PARK_FLAG: False}) is h  # disabled (e.g. ControlNet output residuals)
    hsp = torch.randn(1, 4, 8, 8)
    assert parking.unpark(h, hsp, options)[1] is hsp


def test_attention_chunk_size_reaches_transformer_options(lm, hm):
    model = hm.unet_patcher(seed=25)
    patched = low_memory(model, attention_chunk_tokens=4096)
    assert patched.model_options["transformer_options"][lm.LINEAR_ATTENTION_CHUNK_KEY] == 4096
    assert lm.LINEAR_ATTENTION_CHUNK_KEY not in model.model_options["transformer_options"]

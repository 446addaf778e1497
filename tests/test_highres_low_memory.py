"""Low-memory mode changes memory only: the sampled latents match normal mode (fp32, tolerance 1e-5 relative to
the latent scale), and every patch is gone once the model is unloaded."""
import importlib
import inspect

import pytest
import torch

TOLERANCE = 1e-5  # fp32; batch-1 vs batch-2 and chunked matmuls round differently, nothing else may differ


@pytest.fixture(scope="module")
def lm(core):
    return importlib.import_module(core.__name__ + ".patching.low_memory")


def ksample(model, latent, hm, positive=None, negative=None, steps=3):
    import nodes
    positive = positive or hm.conditioning(10)
    negative = negative or hm.conditioning(11)
    return nodes.common_ksampler(model, 5, steps, 5.0, "euler", "normal", positive, negative,
                                 {"samples": latent}, denoise=1.0)[0]["samples"]


def low_memory(model, **overrides):
    import nodes
    options = dict(sequential_cond=True, ff_chunk_tokens=48, inplace_silu=True, park_skips=True,
                   attention_chunk_tokens=1024, ff_chunking="tokens", ff_chunks=16, offload_other_models=True)
    options.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LinFusionLowMemory"]().patch(model, **options)[0]


@pytest.mark.parametrize("pieces,sizes", [({"chunk_tokens": 48}, [48] * 4 + [8]),   # the token form
                                           ({"chunks": 16}, [13] * 15 + [5]),        # the paper's: 16 pieces
                                           ({"chunks": 3}, [67, 67, 66])])
def test_chunked_feed_forward_equals_the_plain_one(lm, hm, pieces, sizes):
    model = hm.unet_patcher(seed=20)
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    x = torch.randn(2, 200, 32)
    chunked = lm.ChunkedFeedForward(block.ff, **pieces)
    seen = []
    hook = block.ff.net.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        out = chunked(x)
    finally:
        hook.remove()
    assert seen == sizes
    assert torch.allclose(out, block.ff(x), atol=1e-6, rtol=1e-6)
    assert chunked.state_dict().keys() == block.ff.state_dict().keys()  # LoRA keys unchanged
    assert chunked.net is block.ff.net


def test_paper_chunking_is_the_default(lm):
    import nodes

    types = nodes.NODE_CLASS_MAPPINGS["LinFusionLowMemory"].INPUT_TYPES()
    # The inputs added after the first release are optional (older API prompts lack them) with the paper's values.
    inputs = {**types["required"], **types["optional"]}
    assert {"ff_chunking", "ff_chunks", "offload_other_models"} <= set(types["optional"])
    assert inputs["ff_chunking"][1]["default"] == "chunks" and inputs["ff_chunks"][1]["default"] == 16
    defaults = inspect.signature(nodes.NODE_CLASS_MAPPINGS["LinFusionLowMemory"].patch).parameters
    assert [defaults[k].default for k in ("ff_chunking", "ff_chunks", "offload_other_models")] == ["chunks", 16, True]
    assert inputs["park_skips"][1]["default"] is True and inputs["offload_other_models"][1]["default"] is True
    assert lm.LowMemoryOptions().feed_forward_pieces() == {"chunks": 16}
    assert lm.LowMemoryOptions(ff_chunking="tokens", ff_chunk_tokens=4096).feed_forward_pieces() == \
        {"chunk_tokens": 4096}
    assert lm.LowMemoryOptions(ff_chunking="off").feed_forward_pieces() is None
    with pytest.raises(ValueError, match="ff_chunking must be one of"):
        lm.LowMemoryOptions(ff_chunking="16").feed_forward_pieces()


@pytest.mark.parametrize("chunking,ff_sizes", [("tokens", [48] * 8), ("chunks", [24] * 16)])
def test_low_memory_matches_normal_mode(hm, chunking, ff_sizes):
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
        lowmem_model = low_memory(model, ff_chunking=chunking)
        low = ksample(lowmem_model, latent, hm)
        # While the low-memory clone is loaded, its object patches are in the model.
        assert any(isinstance(m, torch.nn.SiLU) and m.inplace for m in unet.modules())
    finally:
        h1.remove(), h2.remove()
    assert normal_batches == [2, 2, 2] and batches == [1] * 6, "cond and uncond did not run one at a time"
    assert normal_ff == [384] * 3 and ff_calls == ff_sizes * 6, "the feed-forward did not run in chunks"
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
    for overrides in ({"sequential_cond": False, "ff_chunking": "off", "inplace_silu": False, "park_skips": False},
                      {"ff_chunking": "off", "inplace_silu": False, "park_skips": False},
                      {"sequential_cond": False, "inplace_silu": False, "park_skips": False},
                      {"sequential_cond": False, "ff_chunking": "chunks", "inplace_silu": False, "park_skips": False},
                      {"sequential_cond": False, "ff_chunking": "off", "park_skips": False}):
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


def test_other_models_are_unloaded_around_the_unet(lm, hm):
    """The offload piece: ComfyUI's free_memory unloads what sampling does not need (here the VAE) from the
    UNet's device and keeps the UNet, its clones and its additional models. Run on the CPU device by hand:
    the wrapper itself skips a CPU UNet (nothing to gain), so on this machine we check that it is called
    during sampling and leaves the CPU models alone; the GPU path is the same call with the GPU device."""
    import comfy.model_management as mm

    cpu = torch.device("cpu")
    unet = hm.unet_patcher(seed=26)
    extra = hm.unet_patcher(seed=27)          # stands for an additional model the UNet carries (LinFusion's)
    unet.set_additional_models("test_extra", [extra])
    vae = hm.tiny_vae()
    mm.load_models_gpu([unet, vae.patcher])
    loaded = lambda: [lm_.model for lm_ in mm.current_loaded_models]  # noqa: E731
    assert vae.patcher in loaded() and unet in loaded()

    calls = []
    original = lm.OffloadOtherModels.__call__

    def spy(self, executor, model, *args, **kwargs):
        calls.append(model)
        return original(self, executor, model, *args, **kwargs)

    lm.OffloadOtherModels.__call__ = spy
    try:
        ksample(low_memory(unet), torch.zeros(1, 4, 8, 8), hm, steps=1)
    finally:
        lm.OffloadOtherModels.__call__ = original
    assert len(calls) == 1 and calls[0].is_clone(unet), "ComfyUI did not call the offload wrapper"
    assert vae.patcher in loaded(), "a CPU UNet must leave the other CPU models alone"

    unloaded = lm.unload_models_besides([unet.clone()] + unet.get_nested_additional_models(), cpu)
    assert vae.patcher in unloaded and vae.patcher not in loaded()
    # Clones count as the same model (a clone shares the weights; ComfyUI clones additional models with it).
    assert any(m.is_clone(unet) for m in loaded()) and any(m.is_clone(extra) for m in loaded())
    assert all(not m.is_clone(unet) and not m.is_clone(extra) for m in unloaded)
    without = low_memory(unet, offload_other_models=False)
    import comfy.patcher_extension as pe
    assert lm.WRAPPER_KEY not in without.wrappers.get(pe.WrappersMP.PREPARE_SAMPLING, {})
    assert lm.WRAPPER_KEY in low_memory(unet).wrappers[pe.WrappersMP.PREPARE_SAMPLING]

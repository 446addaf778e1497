"""The progressive upscale node: stage sizes and sigmas, one progress bar, interruption, LoRA and ControlNet in
every stage, and the recipe choices (anchoring, SDXL size conditioning, skip-residual form) doing what they say."""
import importlib

import pytest
import torch


def run_node(model, vae, hm, latent, positive=None, negative=None, **overrides):
    import nodes
    args = dict(seed=1, stages=2, target_width=0, target_height=0, ladder="sd15", strengths="", base_steps=10,
                cfg=5.0, sampler_name="euler", scheduler="normal", upscale_in="pixels", demofusion=False,
                anchoring="off", vae_tile_size=0, return_stage_images=False)
    args.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]().upscale(
        model, positive or hm.conditioning(10), negative or hm.conditioning(11), vae, latent={"samples": latent},
        **args)


def recording_wrapper(log):
    def wrapper(executor, x, t, *args, **kwargs):
        log.append((tuple(x.shape[-2:]), float(t[0])))
        return executor(x, t, *args, **kwargs)
    return wrapper


def test_ladder_sizes_sigmas_and_one_progress_bar(host, hm, vae, pu):
    import comfy.patcher_extension

    model = hm.unet_patcher(seed=30).clone()
    calls = []
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", recording_wrapper(calls))
    host.progress = []
    latent = torch.randn(1, 4, 8, 12) * 0.5  # 96 x 64 px
    out, images = run_node(model, vae, hm, latent, return_stage_images=True)
    assert out["samples"].shape == (1, 4, 32, 48)
    assert [tuple(i.shape[1:3]) for i in images] == [(64, 96), (128, 192), (256, 384)]
    # sd15 ladder at base_steps 10: strengths 0.4 / 0.3 -> 4 + 3 steps, the last ones of the 10-step schedule.
    full = pu.stage_sigmas(model, "euler", "normal", 10, 10)
    assert [c[0] for c in calls] == [(16, 24)] * 4 + [(32, 48)] * 3
    assert [c[1] for c in calls] == pytest.approx(full[-5:-1].tolist() + full[-4:-1].tolist(), rel=1e-5)
    # One bar for the whole job: 7 steps + 5 VAE passes (decode and encode per stage, the kept final decode).
    total = 12 * pu.progress.RESOLUTION
    values = [v for _, v, _ in host.progress]
    assert values and values == sorted(values) and values[-1] == total
    assert all(t == total for _, _, t in host.progress), "more than one progress bar"


def test_target_size_odd_aspect_and_latent_upscale(hm, vae):
    model = hm.unet_patcher(seed=31)
    latent = torch.randn(1, 4, 8, 12) * 0.5  # 96 x 64 px -> 200 x 136 px
    out, images = run_node(model, vae, hm, latent, target_width=200, target_height=136, ladder="sdxl",
                           upscale_in="latent", anchoring=True, base_steps=6)  # a saved workflow's anchor_stats
    assert images == []
    # return_stage_images in latent mode: the base and every stage, as the tooltip says (not only the final).
    out2, images = run_node(model, vae, hm, latent, target_width=200, target_height=136, ladder="sdxl",
                            upscale_in="latent", anchoring=True, base_steps=6, return_stage_images=True)
    assert torch.equal(out2["samples"], out["samples"])
    assert [tuple(i.shape[1:3]) for i in images] == [(64, 96), (128, 192), (136, 200)]
    assert (images[0] - vae.decode(latent)).abs().max() <= 1e-5
    assert (images[-1] - vae.decode(out["samples"])).abs().max() <= 1e-5
    samples = out["samples"]
    assert samples.shape == (1, 4, 17, 25)
    # The former anchor_stats = True runs as "every stage to the base": the base latent's per-channel mean/std
    # (torch's default std, as the paper's code).
    assert torch.allclose(samples.mean(dim=(2, 3)), latent.mean(dim=(2, 3)), atol=1e-4)
    assert torch.allclose(samples.std(dim=(2, 3)), latent.std(dim=(2, 3)), atol=1e-4)
    with pytest.raises(ValueError, match="both target_width and target_height"):
        run_node(model, vae, hm, latent, target_width=200)
    with pytest.raises(ValueError, match="give the strengths explicitly"):
        run_node(model, vae, hm, latent, stages=5)


def test_interruption_mid_stage_leaves_no_patched_state(hm, vae):
    import comfy.model_management
    import comfy.patcher_extension

    base = hm.unet_patcher(seed=32)
    before = hm.model_state(base)
    model = base.clone()
    calls = []

    def cancel_in_stage_two(executor, x, t, *args, **kwargs):
        calls.append(tuple(x.shape[-2:]))
        if x.shape[-1] == 48 and calls.count((32, 48)) == 1:
            comfy.model_management.interrupt_current_processing(True)  # the user presses cancel
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", cancel_in_stage_two)
    wrappers_before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()}
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(model, vae, hm, torch.randn(1, 4, 8, 12) * 0.5, demofusion=True)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    # This wrapper sits outside DemoFusion's (added first): one call per step. The cancel comes in the first
    # step of stage 2, and DemoFusion's check before its dilated branch stops it right there.
    assert calls == [(16, 24)] * 4 + [(32, 48)], "stage 2 went on after the interruption"
    assert model.wrappers == wrappers_before, "the per-stage DemoFusion patch leaked into the input MODEL"
    hm.assert_same_state(before, hm.model_state(base))


def test_lora_applies_in_every_stage(hm, vae):
    import comfy.sd

    model = hm.unet_patcher(seed=33)
    target = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_q
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q"
    lora = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(4.0)}
    lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0.0)
    expected = target.weight.detach().clone() + 0.5 * (up @ down)
    seen = []
    handle = target.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].shape[1], torch.allclose(m.weight, expected, atol=1e-6))))
    try:
        run_node(lora_model, vae, hm, torch.randn(1, 4, 8, 12) * 0.5)
    finally:
        handle.remove()
    assert {tokens for tokens, _ in seen} == {16 * 24, 32 * 48}, "not every stage ran"
    assert all(ok for _, ok in seen), "a stage ran without the LoRA"


def test_controlnet_hint_is_resized_per_stage(hm, vae):
    import nodes

    model = hm.unet_patcher(seed=34)
    control = hm.tiny_controlnet(seed=35)
    hint = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(6))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(hm.conditioning(10), hm.conditioning(11), control,
                                                                 hint, 1.0, 0.0, 1.0)
    hints = []
    handle = control.control_model.register_forward_pre_hook(
        lambda m, a, kw: hints.append((tuple(kw["x"].shape[-2:]), tuple(kw["hint"].shape[-2:]))), with_kwargs=True)
    try:
        out = run_node(model, vae, hm, torch.randn(1, 4, 8, 12) * 0.5, positive=pos, negative=neg)[0]["samples"]
    finally:
        handle.remove()
    assert hints == [((16, 24), (128, 192))] * 4 + [((32, 48), (256, 384))] * 3
    plain = run_node(model, vae, hm, torch.randn(1, 4, 8, 12) * 0.5)[0]["samples"]
    assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("tile", [64, 128])
def test_tiled_vae_between_stages_equals_untiled(hm, vae, tile):
    """vae_tile_size routes the ladder through the exact tiled VAE: the same latents as the untiled VAE
    (small tiles included: ComfyUI's own tiled VAE divides by zero at 64/128 px with a 64 px overlap)."""
    model = hm.unet_patcher(seed=33)
    latent = torch.randn(1, 4, 8, 12) * 0.5
    plain, _ = run_node(model, vae, hm, latent, stages=1)
    tiled, _ = run_node(model, vae, hm, latent, stages=1, vae_tile_size=tile)
    scale = plain["samples"].abs().max()
    assert (tiled["samples"] - plain["samples"]).abs().max() <= 1e-4 * scale


def test_image_input_is_encoded_inside_the_one_bar(host, hm, vae, pu):
    import nodes
    model = hm.unet_patcher(seed=37)
    image = torch.rand(1, 69, 100, 3, generator=torch.Generator().manual_seed(8))   # cropped to 96 x 64
    args = dict(seed=1, stages=1, target_width=0, target_height=0, ladder="sd15", strengths="", base_steps=10,
                cfg=5.0, sampler_name="euler", scheduler="normal", upscale_in="pixels", demofusion=False,
                anchoring="off", vae_tile_size=0, return_stage_images=True)
    host.progress = []
    out, images = nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]().upscale(
        model, hm.conditioning(10), hm.conditioning(11), vae, image=image, **args)
    assert out["samples"].shape == (1, 4, 16, 24)
    # The first stage resizes the image itself (no VAE round trip of the input, as the paper's super-resolution).
    assert torch.equal(images[0], image)
    total = (4 + 1 + 1) * pu.progress.RESOLUTION   # 4 steps, the stage's encode, final decode
    assert {t for _, _, t in host.progress} == {total} and host.progress[-1][1] == total
    # Anchoring to the base needs the base latent's stats: the input is encoded too, inside the same bar.
    host.progress = []
    nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]().upscale(
        model, hm.conditioning(10), hm.conditioning(11), vae, image=image, **{**args, "anchoring": pu.ANCHOR_BASE})
    total = (4 + 1 + 1 + 1) * pu.progress.RESOLUTION
    assert {t for _, _, t in host.progress} == {total} and host.progress[-1][1] == total


# -- the VAE crossing: auto / untiled / exact tiled (never ComfyUI's inexact tiles) --------------------
def test_vae_codec_auto_picks_the_exact_tiled_vae_above_its_bound(core, hm, vae):
    vc = importlib.import_module(core.__name__ + ".highres.vae_codec")
    tv = importlib.import_module(core.__name__ + ".tiling.tiled_vae")
    # The automatic rule: untiled only when ComfyUI's estimate fits the free memory AND the image is small.
    assert tv.choose_untiled(need_bytes=1 << 30, free_bytes=2 << 30, pixels=512 * 512, max_pixels=1024 * 1024)
    assert not tv.choose_untiled(need_bytes=3 << 30, free_bytes=2 << 30, pixels=512 * 512, max_pixels=1024 * 1024)
    assert not tv.choose_untiled(need_bytes=1 << 20, free_bytes=2 << 30, pixels=2048 * 2048, max_pixels=1024 * 1024)
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))   # 96 x 64 px
    auto = vc.VaeCodec(vae)                                     # small image on this machine: untiled
    small_bound = vc.VaeCodec(vae, max_untiled_pixels=64 * 64)  # the same image above the bound: exact tiled
    untiled, tiled = vc.VaeCodec(vae, vc.UNTILED), vc.VaeCodec(vae, 32)
    images = {name: c.decode(latent) for name, c in
              (("auto", auto), ("bound", small_bound), ("untiled", untiled), ("tiled", tiled))}
    latents = {name: c.encode(images["untiled"]) for name, c in
               (("auto", auto), ("bound", small_bound), ("untiled", untiled), ("tiled", tiled))}
    assert auto.passes == untiled.passes == [("decode", "untiled"), ("encode", "untiled")]
    assert small_bound.passes == [("decode", f"tiled {vc.AUTO_TILE}"), ("encode", f"tiled {vc.AUTO_TILE}")]
    assert tiled.passes == [("decode", "tiled 32"), ("encode", "tiled 32")]
    reference = vae.decode(latent)
    for name in images:   # every path is the same function as VAE Decode / VAE Encode
        assert (images[name] - reference).abs().max() <= 1e-4, name
        assert (latents[name] - vae.encode(images["untiled"])).abs().max() <= 1e-4, name


# -- an upscale model for the pixel-space x2 step ---------------------------------------------------------
@pytest.fixture(scope="module")
def upscale_model(host, tmp_path_factory):
    """A tiny random-weight RealESRGAN-compact (SRVGGNetCompact, x4) saved as a file in a temporary
    models/upscale_models folder and loaded through ComfyUI's own Load Upscale Model node (spandrel)."""
    import comfy.utils
    import folder_paths
    import nodes
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)
    folder = tmp_path_factory.mktemp("models") / "upscale_models"
    folder.mkdir()
    comfy.utils.save_torch_file(net.state_dict(), str(folder / "tiny_compact_x4.safetensors"))
    folder_paths.add_model_folder_path("upscale_models", str(folder))
    folder_paths.filename_list_cache.clear()
    loader = nodes.NODE_CLASS_MAPPINGS["UpscaleModelLoader"]
    model = loader.execute("tiny_compact_x4.safetensors").result[0]
    assert model.scale == 4 and model.architecture.name == "RealESRGAN Compact"
    return model


def test_upscale_model_replaces_bicubic_and_lands_on_the_stage_size(host, core, hm, vae, pu, upscale_model,
                                                                   every_progress_update):
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    px = importlib.import_module(core.__name__ + ".highres.pixel_upscale")
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(4))
    ours = px.upscale_image(image, 192, 128, upscale_model)
    # ComfyUI's own node (x4), then the area resize to the exact x2 stage size.
    theirs = ImageUpscaleWithModel.execute(upscale_model, image).result[0]
    assert theirs.shape == (1, 256, 384, 3)
    assert ours.shape == (1, 128, 192, 3)
    assert (ours - px.resize_image(theirs, 192, 128, "area")).abs().max() <= 1e-5
    assert (ours - px.resize_image(image, 192, 128)).abs().max() > 0.05   # not the bicubic step

    model = hm.unet_patcher(seed=36)
    calls = []
    handle = upscale_model.model.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(5)) * 0.5
    host.progress = []
    try:
        out, images = run_node(model, vae, hm, latent, stages=1, return_stage_images=True,
                               upscale_model=upscale_model)
    finally:
        handle.remove()
    # The model's tiles move the one bar: 4 steps + decode, upscale model, encode + the kept final decode.
    total = 8 * pu.progress.RESOLUTION
    assert {t for _, _, t in host.progress} == {total} and host.progress[-1][1] == total
    assert any(1 * 100 < v < 2 * 100 for _, v, _ in host.progress), "no tile progress from the upscale model"
    plain, _ = run_node(model, vae, hm, latent, stages=1)
    assert calls, "the upscale model did not run"
    assert [tuple(i.shape[1:3]) for i in images] == [(64, 96), (128, 192)]
    assert out["samples"].shape == plain["samples"].shape == (1, 4, 16, 24)
    assert not torch.allclose(out["samples"], plain["samples"], atol=1e-3)


def test_upscale_model_loads_through_its_patcher_where_comfyui_has_one(core, upscale_model, monkeypatch):
    """ComfyUI 0.33's upscale models carry a ModelPatcher, which its own node loads with load_models_gpu (so
    DynamicVRAM and the memory accounting see it); 0.3.75's have none and are moved by hand. The ladder's
    upscale step does what the host's node does."""
    import comfy.model_management as mm

    px = importlib.import_module(core.__name__ + ".highres.pixel_upscale")
    loaded, load = [], mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **kw: loaded.append(list(models)) or load(models, *a, **kw))
    image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(4))
    out = px.run_upscale_model(upscale_model, image)
    assert out.shape == (1, 128, 192, 3)
    patcher = getattr(upscale_model, "patcher", None)
    assert loaded == ([[patcher]] if patcher is not None else [])


# ---------------------------------------------------------------- the recipe choices
def core_module(pu, name):
    return importlib.import_module(pu.__name__.rsplit(".", 1)[0] + "." + name)


def plan(pu, latent, stages):
    """x2 stages at strength 0.5 of 4 base steps: 2 steps each."""
    return core_module(pu, "highres_schedule").plan_stages(latent.shape[-1] * 8, latent.shape[-2] * 8,
                                                           num_stages=stages, strengths=[0.5] * stages, base_steps=4)


def channel_stats(pu, x):
    return core_module(pu, "latent_filters").channel_stats(x)


def run_core(pu, model, vae, latent, positive, negative, on_stage=None, stages=2, **options):
    return pu.progressive_upscale(model, positive, negative, pu.VaeCodec(vae), latent, plan(pu, latent, stages),
                                  seed=1, cfg=5.0, sampler_name="euler", scheduler="ddim_uniform", base_steps=4,
                                  latent_upscale=True, on_stage=on_stage, **options)[0]


def test_anchoring_modes(hm, vae, pu):
    """Every stage ends on the base latent's stats ('to the base'), on its own input's ('to its input'), or on
    neither ('off'); the stats are taken before the next stage's upscale, so every stage shows them."""
    model = hm.unet_patcher(seed=36)
    latent = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(12)) * 0.5 + 0.3
    pos, neg = hm.conditioning(10), hm.conditioning(11)
    seen = {}
    for mode in (pu.ANCHOR_BASE, pu.ANCHOR_INPUT, pu.ANCHOR_OFF):
        seen[mode] = []
        run_core(pu, model, vae, latent, pos, neg, anchoring=mode,
                 on_stage=lambda stage, samples, mode=mode: seen[mode].append(samples.clone()))
    base_stats = channel_stats(pu, latent)
    for out in seen[pu.ANCHOR_BASE]:
        for a, b in zip(channel_stats(pu, out), base_stats):
            assert torch.allclose(a, b, atol=1e-5)
    previous = latent
    for out in seen[pu.ANCHOR_INPUT]:
        stage_input = pu.resize_latent(previous, out.shape[-1] * 8, out.shape[-2] * 8)
        for a, b in zip(channel_stats(pu, out), channel_stats(pu, stage_input)):
            assert torch.allclose(a, b, atol=1e-5)
        previous = out
    for out in seen[pu.ANCHOR_OFF]:
        assert not torch.allclose(channel_stats(pu, out)[1], base_stats[1], atol=1e-3)
    # 'paper (follows ladder)' and the former boolean of saved workflows.
    assert pu.resolve_anchoring(pu.ANCHOR_AUTO, "sdxl") == pu.ANCHOR_BASE
    assert pu.resolve_anchoring(pu.ANCHOR_AUTO, "sd15") == pu.ANCHOR_OFF
    assert pu.resolve_anchoring(True, "sd15") == pu.ANCHOR_BASE
    assert pu.resolve_anchoring(False, "sdxl") == pu.ANCHOR_OFF
    with pytest.raises(ValueError, match="anchoring must be one of"):
        pu.resolve_anchoring("sometimes", "sdxl")
    import nodes
    cls = type(nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]())
    assert cls.VALIDATE_INPUTS(anchoring=False) is True and cls.VALIDATE_INPUTS(anchoring=pu.ANCHOR_INPUT) is True
    assert "must be one of" in cls.VALIDATE_INPUTS(anchoring="sometimes")


def size_ids_seen(model, record):
    """An APPLY_MODEL wrapper recording the six SDXL size ids the UNet's `y` carries (decoded from the
    embedding by comparing with comfy's own embedder)."""
    def wrapper(executor, x, t, *args, **kwargs):
        record.append(kwargs["y"][:, -6 * 256:].clone())
        return executor(x, t, *args, **kwargs)
    return wrapper


def size_embedding(*ids):
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    return timestep_embedding(torch.tensor(ids, dtype=torch.float32), 256).reshape(1, -1)


def test_sdxl_size_conditioning_reaches_encode_adm(hm, vae, pu, core):
    """Each choice sets the size ids SDXL's encode_adm embeds into y, for every stage, cond and uncond."""
    import comfy.patcher_extension
    sz = importlib.import_module(core.__name__ + ".highres.sdxl_size")
    model = hm.sdxl_unet_patcher(seed=37).clone()
    seen = []
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", size_ids_seen(model, seen))
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(13)) * 0.5  # 48 x 32 px
    given = dict(width=1000, height=700, target_width=900, target_height=600)
    cases = {  # mode, conditioning options -> (h, w, crop, crop, target h, target w) per stage
        (sz.SIZE_FINAL, False): [(128, 192, 0, 0, 128, 192)] * 2,
        (sz.SIZE_STAGE, False): [(64, 96, 0, 0, 64, 96), (128, 192, 0, 0, 128, 192)],
        (sz.SIZE_AS_GIVEN, True): [(700, 1000, 0, 0, 600, 900)] * 2,
        (sz.SIZE_AS_GIVEN, False): [(64, 96, 0, 0, 64, 96), (128, 192, 0, 0, 128, 192)],  # ComfyUI's default
    }
    for (mode, with_given), per_stage in cases.items():
        seen.clear()
        options = given if with_given else {}
        run_core(pu, model, vae, latent, hm.sdxl_conditioning(60, **options), hm.sdxl_conditioning(61, **options),
                 size_conditioning=mode)
        # 2 steps per stage (strength 0.5 of 4), one batched cond + uncond call each
        assert len(seen) == 4, mode
        for y, ids in zip(seen, [per_stage[0]] * 2 + [per_stage[1]] * 2):
            assert torch.allclose(y, size_embedding(*ids).expand_as(y), atol=1e-6), (mode, ids)


def test_size_conditioning_leaves_other_models_untouched(hm, vae, pu, core):
    sz = importlib.import_module(core.__name__ + ".highres.sdxl_size")
    model = hm.unet_patcher(seed=38)
    pos, neg = hm.conditioning(10), hm.conditioning(11)
    for mode in sz.SIZE_CONDITIONINGS:
        assert sz.stage_conditioning(model.model, pos, mode, (64, 64), (128, 128)) is pos
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(14)) * 0.5
    outs = [run_core(pu, model, vae, latent, pos, neg, stages=1, size_conditioning=mode)
            for mode in (sz.SIZE_FINAL, sz.SIZE_AS_GIVEN)]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="size conditioning must be one of"):
        sz.stage_conditioning(model.model, pos, "huge", (64, 64), (128, 128))


def test_skip_residual_on_state_needs_a_single_step_sampler(hm, vae, pu, core, caplog):
    srs = importlib.import_module(core.__name__ + ".highres.skip_residual_sampler")
    with pytest.raises(ValueError, match="single-step samplers"):
        srs.skip_residual_sampler("dpmpp_2m")
    # In the ladder a multistep sampler falls back to the model-input form, and says so.
    model = hm.unet_patcher(seed=39)
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(15)) * 0.5
    with caplog.at_level("WARNING", logger="LinFusion"):
        pu.progressive_upscale(model, hm.conditioning(10), hm.conditioning(11), pu.VaeCodec(vae), latent,
                               plan(pu, latent, 1), seed=1, cfg=5.0, sampler_name="dpmpp_2m", scheduler="normal",
                               base_steps=4, latent_upscale=True, demofusion=True)
    assert "multistep sampler" in caplog.text


def test_saved_workflow_with_the_former_anchor_stats_boolean_validates(host):
    """A workflow saved before `anchoring` replaced the boolean `anchor_stats` (same widget position) holds
    true/false there; as the frontend loads it (the newer optional widgets at their defaults), ComfyUI's own
    validation accepts it, and the node runs it as "to the base" / "off" (resolve_anchoring, tested above)."""
    import asyncio

    import execution
    from workflow_convert import live_object_info, widget_slots, workflow_to_api
    from workflow_shrink import load

    defs = live_object_info()
    wf = load("linfusion_7_super_resolution.json")
    node = next(n for n in wf["nodes"] if n["type"] == "LinFusionProgressiveUpscale")
    slot = [s.name for s in widget_slots(defs["LinFusionProgressiveUpscale"])].index("anchoring")
    for old in (True, False):
        node["widgets_values"][slot] = old
        prompt = workflow_to_api(wf, defs)
        assert prompt[str(node["id"])]["inputs"]["anchoring"] is old
        _, _, _, node_errors = asyncio.run(execution.validate_prompt("old-workflow", prompt, None))
        for e in node_errors.get(str(node["id"]), {}).get("errors", []):
            assert e["extra_info"]["input_name"] != "anchoring", e
        for errs in node_errors.values():  # only the files a user downloads may be missing on the test host
            # (0.33's Load Image reports a missing file as a failed custom validation, "Invalid image file")
            assert all(e["type"] == "value_not_in_list" or (e["type"] == "custom_validation_failed"
                                                            and " - Invalid " in e["details"])
                       for e in errs["errors"]), errs
    # A value that is neither a choice nor a former boolean is still refused, by name.
    node["widgets_values"][slot] = "sometimes"
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("old-workflow", workflow_to_api(wf, defs), None))
    assert any(e["extra_info"].get("input_name") == "anchoring" for e in node_errors[str(node["id"])]["errors"])

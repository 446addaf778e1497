"""DemoFusion-style refinement: the step math, the dilation patch, wrapper chaining and a clean model after
sampling, an exception or an interruption."""
import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def df(core):
    return importlib.import_module(core.__name__ + ".highres.demofusion")


@pytest.fixture(scope="module")
def node(host):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["LinFusionDemoFusion"]()


def ksample(model, latent, hm, steps=3, denoise=0.5, seed=3):
    import nodes
    return nodes.common_ksampler(model, seed, steps, 4.0, "euler", "normal", hm.conditioning(10), hm.conditioning(11),
                                 {"samples": latent}, denoise=denoise)[0]["samples"]


def test_demofusion_denoise_formula(df, core):
    hs = importlib.import_module(core.__name__ + ".highres.highres_schedule")
    lf = importlib.import_module(core.__name__ + ".highres.latent_filters")
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 4, 12, 16, generator=g)
    t = torch.tensor([600.0, 600.0])
    d = lambda v: 0.5 * v + 1.0          # noqa: E731  two distinguishable "models"
    dd = lambda v: -0.25 * v             # noqa: E731
    out = df.demofusion_denoise(d, dd, x, t, ref, ratio=2)
    c = hs.cosine_factor(600.0)
    xm = x * (1 - c ** 3) + ref * c ** 3
    xb = lf.blur_restandardised(xm, 3, hs.blur_sigma(c, 0.8), "zeros")  # the paper's blur, the default
    expected = (1 - c) * d(xm) + c * (dd(xb) + xm - xb)
    assert torch.allclose(out, expected, atol=1e-6)
    # At t = 0 the weights vanish: plain model on plain x.
    assert torch.allclose(df.demofusion_denoise(d, dd, x, torch.zeros(2), ref, 2), d(x), atol=1e-6)
    # Ratio 1 never calls the dilated branch.
    assert torch.equal(df.demofusion_denoise(d, None, x, t, None, 1), d(x))


def test_dilated_convs_scale_and_restore(df, hm):
    unet = hm.unet_patcher(seed=5).model.diffusion_model
    before = {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    spatial = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert spatial
    with df.dilated_convs(unet, 4) as count:
        assert count == len(spatial)
        for n, m in unet.named_modules():
            if n in spatial:
                assert m.dilation == (4, 4) and m.padding == (4, 4)
            elif isinstance(m, torch.nn.Conv2d):
                assert (m.dilation, m.padding) == before[n]
        # Shapes unchanged under dilation: the UNet still runs and returns its input's shape.
        x = torch.randn(1, 4, 16, 16)
        out = unet(x, torch.tensor([500.0]), context=torch.randn(1, 8, hm.CONTEXT_DIM))
        assert out.shape == x.shape
    assert before == {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    with pytest.raises(RuntimeError, match="boom"):
        with df.dilated_convs(unet, 2):
            raise RuntimeError("boom")
    assert before == {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_patch_changes_sampling_and_leaves_model_bit_identical(hm, node):
    model = hm.unet_patcher(seed=6)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    before = hm.model_state(model)
    plain = ksample(model, latent, hm)
    patched_model = node.patch(model, {"samples": latent}, 2, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    assert model.wrappers == hm.unet_patcher(seed=6).wrappers, "the input MODEL must not be modified"
    refined = ksample(patched_model, latent, hm)
    hm.assert_same_state(before, hm.model_state(model))
    assert not torch.allclose(plain, refined, atol=1e-3), "the refinement had no effect"
    # Without the patch the same model samples exactly as before.
    assert torch.equal(ksample(model, latent, hm), plain)


def test_chains_with_existing_wrappers(hm, node):
    import comfy.patcher_extension

    model = hm.unet_patcher(seed=7).clone()
    calls = {"function_wrapper": 0, "outer": 0, "inner": 0, "outer_dilated": 0, "inner_dilated": 0}

    def function_wrapper(apply_model, args):  # the single-slot model_function_wrapper another node set
        calls["function_wrapper"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    def counting_wrapper(name):
        def wrapper(executor, *args, **kwargs):
            calls[name] += 1
            unet = executor.class_obj.diffusion_model
            calls[name + "_dilated"] += any(m.dilation != (1, 1) for m in unet.modules()
                                            if isinstance(m, torch.nn.Conv2d))
            return executor(*args, **kwargs)
        return wrapper

    model.set_model_unet_function_wrapper(function_wrapper)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "before", counting_wrapper("outer"))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    patched = node.patch(model, {"samples": latent}, 2, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "after", counting_wrapper("inner"))
    assert patched.model_options["model_function_wrapper"] is function_wrapper
    ksample(patched, latent, hm, steps=3)
    # Wrappers run in the order they were added: the earlier one around ours, once per step (one batched
    # cond+uncond call), never seeing the dilation; the later one inside ours, for both branches, except at
    # the last step: its sigma is sigma_min, timestep 0, where c = 0 and branch 2 is skipped.
    assert calls["function_wrapper"] == 3
    assert (calls["outer"], calls["outer_dilated"]) == (3, 0)
    assert (calls["inner"], calls["inner_dilated"]) == (5, 2)


def test_exception_inside_the_dilated_branch_restores_the_model(hm, node):
    model = hm.unet_patcher(seed=8)
    before = hm.model_state(model)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    patched = node.patch(model, {"samples": latent}, 2, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    unet = model.model.diffusion_model

    def explode_when_dilated(module, args):
        if unet.input_blocks[0][0].dilation != (1, 1):
            raise RuntimeError("failure inside the dilated branch")

    handle = unet.input_blocks[0][0].register_forward_pre_hook(explode_when_dilated)
    try:
        with pytest.raises(RuntimeError, match="failure inside the dilated branch"):
            ksample(patched, latent, hm)
    finally:
        handle.remove()
    hm.assert_same_state(before, hm.model_state(model))


def test_interruption_inside_the_dilated_branch_restores_the_model(hm, node):
    import comfy.model_management

    model = hm.unet_patcher(seed=9)
    before = hm.model_state(model)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    patched = node.patch(model, {"samples": latent}, 2, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    unet = model.model.diffusion_model
    seen = []

    def cancel_when_dilated(module, args):  # the user presses cancel while branch 2 runs
        if unet.input_blocks[0][0].dilation != (1, 1):
            seen.append(True)
            comfy.model_management.interrupt_current_processing(True)

    handle = unet.input_blocks[0][0].register_forward_pre_hook(cancel_when_dilated)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ksample(patched, latent, hm, steps=4)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert len(seen) == 1, "sampling went on after the interruption"
    hm.assert_same_state(before, hm.model_state(model))


def test_auto_ratio_and_match_stats_node(hm, node, df):
    import nodes

    model = hm.unet_patcher(seed=10)
    latent = torch.randn(1, 4, 24, 16)  # 128 x 192 px: below SD's native 512 -> ratio 1
    patched = node.patch(model, {"samples": latent}, 0, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    wrappers = [w for ws in patched.wrappers.values() for lst in ws.values() for w in lst]
    assert [w.ratio for w in wrappers if isinstance(w, df.DemoFusionWrapper)] == [1]
    big = torch.zeros(1, 4, 200, 96)  # 1600 px long side -> ceil(1600 / 512) = 4
    patched = node.patch(model, {"samples": big}, 0, 0, True, 0.8, 3.0, 1.0, 1.0)[0]
    wrappers = [w for ws in patched.wrappers.values() for lst in ws.values() for w in lst]
    assert [w.ratio for w in wrappers if isinstance(w, df.DemoFusionWrapper)] == [4]

    match = nodes.NODE_CLASS_MAPPINGS["LinFusionMatchLatentStats"]()
    ref = torch.randn(1, 4, 8, 8) * 3 + 1
    out = match.match({"samples": torch.randn(1, 4, 32, 32)}, {"samples": ref})[0]["samples"]
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)


def test_skip_residual_sampler_is_a_sampler_custom_advanced_sampler(hm, core):
    """The exact-form SAMPLER without the noise handed over (as under SamplerCustomAdvanced) recovers it from the
    noised start: the same result as with the noise given; and the residual does act (vs plain euler)."""
    import comfy.sample
    import comfy.samplers
    srs = importlib.import_module(core.__name__ + ".highres.skip_residual_sampler")
    model = hm.unet_patcher(seed=12)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = comfy.sample.prepare_noise(latent, 4)
    sigmas = comfy.samplers.KSampler(model, steps=10, device="cpu", sampler="euler", scheduler="ddim_uniform",
                                     denoise=1.0).sigmas[-8:]  # strength 0.7: t = 601, 501, ..., 1

    def run(sampler):
        return comfy.sample.sample_custom(model, noise, 4.0, sampler, sigmas, hm.conditioning(10),
                                          hm.conditioning(11), latent, disable_pbar=True, seed=4)
    given = run(srs.skip_residual_sampler("euler", noise=noise))
    recovered = run(srs.skip_residual_sampler("euler"))
    plain = run(comfy.samplers.sampler_object("euler"))
    assert (recovered - given).abs().max() <= 1e-5 * given.abs().max()
    assert not torch.allclose(given, plain, atol=1e-4)


def test_hand_built_sampler_custom_advanced_graph_equals_the_ladder_exact_form(hm, node, core):
    """DemoFusion Refine (skip residual off) + LinFusion Skip Residual Sampler through SamplerCustomAdvanced's
    sampling path = one ladder stage with the skip residual on the sampler state."""
    import comfy.sample
    import nodes
    pu = importlib.import_module(core.__name__ + ".highres.progressive_upscale")
    hs = importlib.import_module(core.__name__ + ".highres.highres_schedule")
    model = hm.unet_patcher(seed=13)
    base = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6)) * 0.5
    pos, neg = hm.conditioning(10), hm.conditioning(11)
    plan = hs.plan_stages(48, 48, num_stages=1, strengths=[0.6], base_steps=10)
    ladder = pu.progressive_upscale(model, pos, neg, pu.VaeCodec(hm.tiny_vae()), base, plan, seed=2, cfg=4.0,
                                    sampler_name="euler", scheduler="ddim_uniform", base_steps=10, latent_upscale=True,
                                    demofusion=True,
                                    anchoring=pu.ANCHOR_OFF, size_conditioning="as given")[0]
    latent = pu.resize_latent(base, 96, 96)
    patched = node.patch(model, {"samples": latent}, 2, 3, False, 0.8, 3.0, 1.0, 1.0)[0]
    sampler = nodes.NODE_CLASS_MAPPINGS["LinFusionSkipResidualSampler"]().get_sampler("euler", 3.0)[0]
    sigmas = pu.stage_sigmas(patched, "euler", "ddim_uniform", 10, 6)
    hand = comfy.sample.sample_custom(patched, comfy.sample.prepare_noise(latent, 3), 4.0, sampler, sigmas, pos, neg,
                                      latent, disable_pbar=True, seed=3)
    assert (hand - ladder).abs().max() <= 1e-5 * ladder.abs().max()

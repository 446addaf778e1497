"""The paper's stage loops, against the ladder.

The official code (Huage001/LinFusion: src/pipelines/pipeline_highres_sdxl.py and pipeline_superres_sdxl.py for
SDXL, with diffusers' Euler scheduler, "leading" timestep spacing; the notebook ultra_text2image_w_sdedit.ipynb for
SD 1.5, with Lykon/dreamshaper-8's own scheduler, diffusers' DEISMultistepScheduler: order 2, logrho, "leading"
spacing of its own, lower_order_final) is written out here as plain loops from its math, over small real ComfyUI UNets called directly (no ComfyUI
sampler, wrapper or conditioning code on the reference side). The ladder node runs with its defaults, the
paper's settings. Both sides share only what the paper's code does not fix in the stage loop and the docs
list as a difference: the noise tensor (seed + stage), the VAE (its mean, not a sample) and the bicubic
resize in torch.

Tolerance: the two sides compute the same numbers in a different order (ComfyUI mixes the branches and the
guidance in denoised space, the paper in noise space; sigmas come from float64 on both sides), so they agree
to fp32 rounding carried through the UNet over the steps: measured 5e-7 to 8e-7 of the latent's largest
magnitude (2-core CPU, fp32); the bar is 5e-6. The smallest changes of recipe moved the SDXL result by more
in development runs: conditioning on the stage size instead of the final one 6e-5, the skip residual on the
model input instead of the sampler state 2e-5 at 16 steps of strength 0.32 (5e-2 at strength 0.7, asserted
below).
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

TOL = 5e-6  # relative to the largest latent magnitude; see the module docstring
TIGHT = 2e-6  # for one short stage (8 steps), where the rounding stays near 4e-7


@pytest.fixture(scope="module")
def node(host):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["LinFusionProgressiveUpscale"]()


# ------------------------------------------------------------------ the official formulas, written out
def official_sigma(t) -> float:
    """diffusers' scaled_linear DDPM betas (0.00085..0.012, 1000 steps) -> Euler sigma at integer timestep t."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return float(((1 - alphas_cumprod[int(t)]) / alphas_cumprod[int(t)]) ** 0.5)


def official_timesteps(num_inference_steps: int, strength: float) -> list[int]:
    """Euler's 'leading' spacing with steps_offset 1, then the SDXL pipelines' truncation ceil(steps * strength)."""
    step_ratio = 1000 // num_inference_steps
    timesteps = [i * step_ratio + 1 for i in range(num_inference_steps)][::-1]
    init_timestep = min(math.ceil(num_inference_steps * strength), num_inference_steps)
    return timesteps[max(num_inference_steps - init_timestep, 0):]


def size_embedding(values) -> torch.Tensor:
    """diffusers' get_timestep_embedding(flip_sin_to_cos=True, shift 0) of SDXL's six size ids, 256 each."""
    t = torch.tensor(values, dtype=torch.float32)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)


def set_all_conv_dilation(unet, ratio: int, saved: dict):
    """As the official loop: every Conv2d's dilation and padding times ratio (restored from `saved`)."""
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            if ratio == 1:
                m.dilation, m.padding = saved[name]
            else:
                m.dilation = (ratio * m.dilation[0], ratio * m.dilation[1])
                m.padding = (ratio * m.padding[0], ratio * m.padding[1])


def official_gaussian_filter(latents, kernel_size, sigma):
    x = torch.arange(kernel_size, dtype=torch.float32)
    g = torch.exp(-(x - (kernel_size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None].repeat(latents.shape[1], 1, 1, 1)
    return F.conv2d(latents, kernel, padding=kernel_size // 2, groups=latents.shape[1])


def guided_eps(unet, x, t, sigma, context, y, cfg):
    """The UNet's noise prediction with classifier-free guidance (batch [uncond, cond], as the pipeline)."""
    inp = torch.cat([x] * 2) / (sigma ** 2 + 1) ** 0.5
    kwargs = {"y": torch.cat(y)} if y is not None else {}
    eps = unet(inp, timesteps=torch.full((2,), float(t)), context=torch.cat(context), **kwargs)
    uncond, cond = eps.chunk(2)
    return uncond + cfg * (cond - uncond)


@torch.no_grad()
def official_stage(unet, latents, noise, timesteps, cfg, context, y=None, ratio=1, demofusion=False,
                   gaussian_sigma=0.8, scales=(3.0, 1.0, 1.0)):
    """One img2img stage of the official code in the model's latent space (Euler steps on eps)."""
    noise_latents = [latents + noise * official_sigma(t) for t in timesteps]  # EulerDiscrete.add_noise
    x = noise_latents[0]
    saved = {n: (m.dilation, m.padding) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for i, t in enumerate(timesteps):
        sigma = official_sigma(t)
        sigma_next = official_sigma(timesteps[i + 1]) if i + 1 < len(timesteps) else 0.0
        if not demofusion:
            x = x + guided_eps(unet, x, t, sigma, context, y, cfg) * (sigma_next - sigma)
            continue
        c = 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))
        c1 = c ** scales[0]
        x = x * (1 - c1) + noise_latents[i] * c1  # the skip residual on the sampler's state
        x1 = x + guided_eps(unet, x, t, sigma, context, y, cfg) * (sigma_next - sigma)
        set_all_conv_dilation(unet, ratio, saved)
        try:
            c3 = 0.99 * c ** scales[2] + 1e-2
            std_, mean_ = x.std(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)
            xg = official_gaussian_filter(x, 2 * ratio - 1, gaussian_sigma * c3)
            xg = (xg - xg.mean(dim=(2, 3), keepdim=True)) / xg.std(dim=(2, 3), keepdim=True) * std_ + mean_
            x2 = x + guided_eps(unet, xg, t, sigma, context, y, cfg) * (sigma_next - sigma)
        finally:
            set_all_conv_dilation(unet, 1, saved)
        c2 = c ** scales[1]
        x = (1 - c2) * x1 + c2 * x2
    return x


def upscale_between_stages(vae, raw_latent, width, height):
    """Decode, bicubic resize (torch), encode: the ladder's pixel-space step (the paper: PIL and a VAE sample)."""
    image = vae.decode(raw_latent)
    image = image.reshape((-1,) + tuple(image.shape[-3:]))
    image = F.interpolate(image.movedim(-1, 1), size=(height, width), mode="bicubic").movedim(1, -1).clamp(0, 1)
    return vae.encode(image[..., :3])


def stage_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def node_args(node, **overrides):
    """The node's widget defaults (the paper's settings), then the overrides."""
    args = {}
    for section in ("required", "optional"):
        for name, spec in node.INPUT_TYPES()[section].items():
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                args[name] = options.get("default", spec[0][0])
            elif "default" in options:
                args[name] = options["default"]
    args.update(overrides)
    return args


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ the tests
def test_official_loop_grid_is_euler_ddim_uniform(hm, pu):
    """The ladder's sigmas for euler + ddim_uniform are the official grid: t = 301, 281, ..., 1, then 0."""
    model = hm.sdxl_unet_patcher(seed=40)
    timesteps = official_timesteps(50, 0.32)
    assert timesteps == list(range(301, 0, -20))
    sigmas = pu.stage_sigmas(model, "euler", "ddim_uniform", 50, 16)
    expected = torch.tensor([official_sigma(t) for t in timesteps] + [0.0], dtype=torch.float64)
    assert torch.allclose(sigmas.double(), expected, rtol=1e-6, atol=0)
    model_sampling = model.get_model_object("model_sampling")
    assert model_sampling.timestep(sigmas[:-1]).tolist() == timesteps
    # The SDXL ladder's strengths 0.32/0.24/0.16/0.08 take the official step counts, ceil(50 * strength).
    for strength, steps in zip((0.32, 0.24, 0.16, 0.08), (16, 12, 8, 4)):
        assert len(official_timesteps(50, strength)) == steps
        assert len(pu.stage_sigmas(model, "euler", "ddim_uniform", 50, steps)) == steps + 1
    assert pu.resolve_sampling(pu.FOLLOW_LADDER, pu.FOLLOW_LADDER, "sdxl") == ("euler", "ddim_uniform")
    # The default 'normal' schedule is not the grid: the choice matters.
    normal = pu.stage_sigmas(model, "euler", "normal", 50, 16)
    assert not torch.allclose(normal.double(), expected, rtol=1e-3)


def test_official_loop_sdxl_two_stages(hm, vae, node):
    """The SDXL high-res pipeline's stage loop (skip residual on x, dilated blurred branch, cosine blend,
    every stage anchored to the base, size conditioning = final size) == the ladder node with its defaults.
    25 base steps instead of 50 keep it fast: the same formulas, t = 281, 241, ..., 1 at strength 0.32."""
    model = hm.sdxl_unet_patcher(seed=41)
    unet = model.model.diffusion_model
    scale = model.model.latent_format.scale_factor
    base = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7)) * 0.6  # 32 px; stages 64, 128 px
    pos, neg = hm.sdxl_conditioning(50), hm.sdxl_conditioning(51)
    seed, cfg, final, base_steps = 5, 5.0, 128, 25
    # Reference: the paper's loop, size ids (final, crop 0, final) for the base and every stage.
    sizes = size_embedding([final, final, 0, 0, final, final])
    context = [neg[0][0], pos[0][0]]
    y = [torch.cat([c[0][1]["pooled_output"], sizes], dim=1) for c in (neg, pos)]
    anchor_mean, anchor_std = base.mean(dim=(2, 3), keepdim=True) * scale, base.std(dim=(2, 3), keepdim=True) * scale
    raw = base
    for s, strength in enumerate((0.32, 0.16), start=1):
        side = 32 * 2 ** s
        raw = upscale_between_stages(vae, raw, side, side)
        latents = official_stage(unet, raw * scale, stage_noise(raw.shape, seed + s),
                                 official_timesteps(base_steps, strength), cfg, context, y, ratio=2 ** s,
                                 demofusion=True)
        latents = (latents - latents.mean(dim=(2, 3), keepdim=True)) / latents.std(dim=(2, 3), keepdim=True) \
            * anchor_std + anchor_mean
        raw = latents / scale
    reference = raw

    args = node_args(node, seed=seed, stages=2, ladder="sdxl", cfg=cfg, demofusion=True, base_steps=base_steps)
    assert (args["sampler_name"], args["scheduler"]) == ("paper (follows ladder)",) * 2   # euler + ddim_uniform
    out = node.upscale(model, pos, neg, vae, latent={"samples": base}, **args)[0]["samples"]
    error = relative_error(out, reference)
    print(f"\nSDXL 2 stages: max |ladder - official| / max |official| = {error:.2e}")
    assert out.shape == reference.shape == (1, 4, 16, 16)
    assert error <= TOL


def test_official_loop_skip_residual_forms_at_high_strength(hm, vae, node, pu):
    """One DemoFusion stage at strength 0.7 (10 base steps: t = 601, 501, ..., 1): the skip residual on the
    sampler state is the official loop; on the model input it is not (the gap the docs describe)."""
    model = hm.unet_patcher(seed=43)
    unet = model.model.diffusion_model
    scale = model.model.latent_format.scale_factor
    base = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9)) * 0.6
    pos, neg = hm.conditioning(54), hm.conditioning(55)
    seed, cfg = 11, 5.0
    raw = upscale_between_stages(vae, base, 64, 64)
    latents = official_stage(unet, raw * scale, stage_noise(raw.shape, seed + 1), official_timesteps(10, 0.7), cfg,
                             [neg[0][0], pos[0][0]], ratio=2, demofusion=True)
    reference = latents / scale
    args = node_args(node, seed=seed, stages=1, ladder="sdxl", strengths="0.7", base_steps=10, cfg=cfg,
                     demofusion=True, anchoring="off")
    exact = node.upscale(model, pos, neg, vae, latent={"samples": base}, **args)[0]["samples"]
    on_input = node.upscale(model, pos, neg, vae, latent={"samples": base},
                            **{**args, "skip_residual": pu.SKIP_ON_INPUT})[0]["samples"]
    error, gap = relative_error(exact, reference), relative_error(on_input, reference)
    print(f"\nstrength 0.7: sampler-state form {error:.2e}, model-input form {gap:.2e}")
    assert error <= TOL
    assert gap > 1e-3


# ------------------------------------------------------------------ the SD 1.5 notebook's DEIS, written out
def deis_leading_timesteps(num_inference_steps: int, strength: float) -> list[int]:
    """diffusers' DEIS set_timesteps, "leading" (ratio = 1000 // (steps + 1), steps_offset 1), then the SD img2img
    pipeline's truncation: init_timestep = int(steps * strength), start at index steps - init_timestep."""
    step_ratio = 1000 // (num_inference_steps + 1)
    timesteps = [i * step_ratio + 1 for i in range(1, num_inference_steps + 1)][::-1]
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return timesteps[num_inference_steps - init_timestep:]


def vp_alpha_sigma(t):
    """alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]) (the VP form DEIS works in)."""
    s = official_sigma(t)
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha


@torch.no_grad()
def official_deis_stage(unet, latents, noise, timesteps, cfg, context, lower_order_final):
    """One SD img2img stage with diffusers' DEISMultistepScheduler (order 2, logrho, eps prediction), in its own
    variance-preserving form: x = alpha_t x0 + sigma_t eps. The last target is t = 0 (sigma_last = sigma(0))."""
    alpha, sigma = vp_alpha_sigma(timesteps[0])
    x = alpha * latents + sigma * noise                           # add_noise
    targets = timesteps[1:] + [0]
    history = []                                                  # (eps, rho) of the previous step
    for i, (t, t_next) in enumerate(zip(timesteps, targets)):
        a_s, s_s = vp_alpha_sigma(t)
        a_t, s_t = vp_alpha_sigma(t_next)
        eps = guided_eps(unet, x / a_s, t, s_s / a_s, context, None, cfg)   # the UNet sees x / alpha (= x * c_in)
        x0 = (x - s_s * eps) / a_s                                # convert_model_output: predict x0 ...
        eps = (x - a_s * x0) / s_s                                # ... and back to the noise DEIS integrates
        rho_t, rho_s0 = s_t / a_t, s_s / a_s
        if not history or (lower_order_final and i == len(timesteps) - 1):
            h = math.log(a_t / s_t) - math.log(a_s / s_s)         # first order: DDIM
            x = (a_t / a_s) * x - s_t * (math.exp(h) - 1.0) * eps
        else:
            m1, rho_s1 = history
            def ind(r, b, c):                                     # integral of (log r - log c) / (log b - log c) dr
                return r * (-math.log(c) + math.log(r) - 1) / (math.log(b) - math.log(c))
            coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1)
            coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0)
            x = a_t * (x / a_s + coef1 * eps + coef2 * m1)
        history = (eps, rho_s0)
    alpha_last, _ = vp_alpha_sigma(0)
    return x / alpha_last   # back to ComfyUI's (k-diffusion) scaling of the latent: x_vp / alpha


def test_official_loop_deis_grid(hm, pu, core):
    """The SD 1.5 ladder's default grid is diffusers' DEIS "leading" grid with img2img's int truncation: stage
    starts t = 381 / 286 / 191 / 96 at 0.4 / 0.3 / 0.2 / 0.1 of 50 steps, then sigma(0), the last training sigma."""
    model = hm.unet_patcher(seed=44)
    model_sampling = model.get_model_object("model_sampling")
    sampler, scheduler = pu.resolve_sampling(pu.FOLLOW_LADDER, pu.FOLLOW_LADDER, "sd15")
    assert (sampler, scheduler) == (pu.DEIS_SAMPLER, pu.LEADING_SCHEDULER)
    for strength, steps, start in zip((0.4, 0.3, 0.2, 0.1), (20, 15, 10, 5), (381, 286, 191, 96)):
        timesteps = deis_leading_timesteps(50, strength)
        assert len(timesteps) == steps and timesteps[0] == start and timesteps[-1] == 20
        sigmas = pu.stage_sigmas(model, sampler, scheduler, 50, steps)
        expected = torch.tensor([official_sigma(t) for t in timesteps + [0]], dtype=torch.float64)
        assert torch.allclose(sigmas.double(), expected, rtol=1e-6, atol=0)
        assert model_sampling.timestep(sigmas).round().tolist() == timesteps + [0]
    # int, not ceil: 25 steps at 0.3 run int(7.5) = 7 steps (the SDXL pipelines' ceil would run 8).
    assert len(deis_leading_timesteps(25, 0.3)) == 7
    hs = importlib.import_module(core.__name__ + ".highres.highres_schedule")
    assert [s.steps for s in hs.plan_stages(32, 32, num_stages=2, ladder="sd15", base_steps=25)] == [10, 7]
    assert [s.steps for s in hs.plan_stages(32, 32, num_stages=2, ladder="sdxl", base_steps=25,
                                            strengths=[0.4, 0.3])] == [10, 8]
    # diffusers itself (a registry package, tests/requirements.txt) as a second reference for the grid. Its
    # alphas_cumprod is a float32 cumprod (ComfyUI's and ours float64), hence 1e-4 on the sigmas.
    ref = diffusers_deis()
    ref.set_timesteps(50)
    assert ref.timesteps[50 - 20:].tolist() == deis_leading_timesteps(50, 0.4)
    assert torch.allclose(ref.sigmas[50 - 20:].double(), expected.new_tensor(
        [official_sigma(t) for t in deis_leading_timesteps(50, 0.4) + [0]]), rtol=1e-4)


def diffusers_deis():
    """The scheduler of Lykon/dreamshaper-8 as its scheduler_config.json sets it up."""
    from diffusers import DEISMultistepScheduler
    return DEISMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1, solver_order=2, solver_type="logrho",
                                  algorithm_type="deis", lower_order_final=True, prediction_type="epsilon")


@pytest.mark.parametrize("base_steps,strength", [(50, 0.4), (50, 0.1), (10, 0.5)])
def test_official_loop_deis_sampler_equals_diffusers(hm, pu, core, base_steps, strength):
    """Our DEIS KSAMPLER over the ladder's sigmas == diffusers' DEISMultistepScheduler stepping an img2img run
    (set_begin_index, add_noise, step) with the same smooth toy noise predictor. Measured 3e-7 to 8e-7; the bar is
    TOL: diffusers computes its sigmas from a float32 cumprod (up to 1e-5 apart from ComfyUI's float64 schedule)
    and its coefficients in float32, and those differences mostly cancel in x0 + sigma * eps."""
    ds = importlib.import_module(core.__name__ + ".highres.deis_sampler")
    model = hm.unet_patcher(seed=44)
    model_sampling = model.get_model_object("model_sampling")
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(1, 4, 6, 5, generator=g), torch.randn(1, 4, 6, 5, generator=g)

    def eps_of(x_vp, t):   # any smooth function of the VP sample and the timestep
        return 0.6 * torch.tanh(x_vp) * math.cos(float(t) / 700) + 0.2 * noise * math.sin(float(t) / 300)

    ref = diffusers_deis()
    ref.set_timesteps(base_steps)
    steps = int(base_steps * strength)
    start = base_steps - steps
    ref.set_begin_index(start)
    x = ref.add_noise(x0, noise, ref.timesteps[start:start + 1])
    for t in ref.timesteps[start:]:
        x = ref.step(eps_of(x, t), t, x).prev_sample
    expected = x * (1 + ref.sigmas[-1].double() ** 2) ** 0.5     # VP -> ComfyUI's scaling (x / alpha)

    sigmas = pu.stage_sigmas(model, pu.DEIS_SAMPLER, pu.LEADING_SCHEDULER, base_steps, steps)

    def denoiser(x_k, sigma):   # ComfyUI's view: x = x0 + sigma eps, the UNet sees x / sqrt(sigma^2 + 1)
        s = float(sigma[0])
        t = model_sampling.timestep(sigma).round()[0]
        return x_k - s * eps_of(x_k / (s * s + 1) ** 0.5, t)

    out = ds.sample_deis_diffusers(denoiser, x0 + noise * sigmas[0], sigmas,
                                   lower_order_final=ds.lower_order_final_for(base_steps))
    error = relative_error(out.double(), expected.double())
    print(f"\nDEIS {base_steps} steps at {strength}: max |ours - diffusers| / max |diffusers| = {error:.2e}")
    assert error <= TOL
    # And the other order schedule is measurably different (the test sees the order of every step).
    other = ds.sample_deis_diffusers(denoiser, x0 + noise * sigmas[0], sigmas,
                                     lower_order_final=not ds.lower_order_final_for(base_steps))
    assert relative_error(other.double(), expected.double()) > 1e-3


@pytest.mark.parametrize("base_steps", [25, 10])
def test_official_loop_sd15_sdedit_stages(hm, vae, node, base_steps):
    """Two stages of the SD 1.5 SDEdit notebook (img2img at strengths 0.4 and 0.3, diffusers' DEIS on its leading
    grid, int steps, no anchoring, no refinement) == the ladder node with its defaults and the sd15 ladder, 64 x 32
    px base. 25 base steps: 10 + 7 steps, every step after the first second order; 10 base steps: 4 + 3 steps with
    diffusers' lower_order_final (the last step first order: schedules under 15 steps)."""
    model = hm.unet_patcher(seed=42)
    unet = model.model.diffusion_model
    scale = model.model.latent_format.scale_factor
    base = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(8)) * 0.6  # 64 x 32 px
    pos, neg = hm.conditioning(52), hm.conditioning(53)
    seed, cfg = 3, 7.5
    raw = base
    for s, strength in enumerate((0.4, 0.3), start=1):
        raw = upscale_between_stages(vae, raw, 64 * 2 ** s, 32 * 2 ** s)
        latents = official_deis_stage(unet, raw * scale, stage_noise(raw.shape, seed + s),
                                      deis_leading_timesteps(base_steps, strength), cfg, [neg[0][0], pos[0][0]],
                                      lower_order_final=base_steps < 15)
        raw = latents / scale
    reference = raw

    args = node_args(node, seed=seed, stages=2, ladder="sd15", cfg=cfg, base_steps=base_steps)
    out = node.upscale(model, pos, neg, vae, latent={"samples": base}, **args)[0]["samples"]
    error = relative_error(out, reference)
    print(f"\nSD 1.5 SDEdit stages (DEIS, {base_steps} base steps): max |ladder - official| / max |official| "
          f"= {error:.2e}")
    assert out.shape == (1, 4, 16, 32)
    assert error <= TOL


def test_official_loop_sdxl_superres_from_image(hm, vae, node, pu):
    """The SDXL super-resolution pipeline's loop on a non-square image, no base latent: resize the image itself to
    the stage size (x2 here), encode, condition SDXL on that size (original = target = stage size), dilate by
    num_scales = ceil(stage width / image width) (landscape), skip residual on x, and anchor the result to the
    upscaled input's mean/std == the ladder node from `image`, one stage, with the super-resolution choices.
    (The paper runs super-resolution as one stage; the ladder's further x2 stages are its own extension.)
    The smallest changes of recipe are asserted to move the result by more than the tolerance: here the bound is
    TIGHT (one stage of 8 steps: measured 3.7e-7), so even the skip residual moved to the model input, 1.9e-5 at
    this strength, fails it."""
    model = hm.sdxl_unet_patcher(seed=45)
    unet = model.model.diffusion_model
    scale = model.model.latent_format.scale_factor
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(10))   # 56 x 40 px, landscape
    pos, neg = hm.sdxl_conditioning(56), hm.sdxl_conditioning(57)
    seed, cfg, base_steps, strength = 6, 5.0, 25, 0.32
    width, height = 112, 80
    num_scales = math.ceil(width / image.shape[2])
    big = F.interpolate(image.movedim(-1, 1), size=(height, width), mode="bicubic").movedim(1, -1).clamp(0, 1)
    latents = vae.encode(big) * scale
    anchor_mean, anchor_std = latents.mean(dim=(2, 3), keepdim=True), latents.std(dim=(2, 3), keepdim=True)
    sizes = size_embedding([height, width, 0, 0, height, width])
    y = [torch.cat([c[0][1]["pooled_output"], sizes], dim=1) for c in (neg, pos)]
    latents = official_stage(unet, latents, stage_noise(latents.shape, seed + 1),
                             official_timesteps(base_steps, strength), cfg, [neg[0][0], pos[0][0]], y,
                             ratio=num_scales, demofusion=True)
    latents = (latents - latents.mean(dim=(2, 3), keepdim=True)) / latents.std(dim=(2, 3), keepdim=True) \
        * anchor_std + anchor_mean
    reference = latents / scale

    args = node_args(node, seed=seed, stages=1, ladder="sdxl", cfg=cfg, demofusion=True, base_steps=base_steps,
                     anchoring=pu.ANCHOR_INPUT, size_conditioning="stage size")

    def run(conditioning=(pos, neg), **changes):
        return node.upscale(model, *conditioning, vae, image=image, **{**args, **changes})[0]["samples"]

    out = run()
    error = relative_error(out, reference)
    sized = [[[c[0][0], {**c[0][1], "width": 1024, "height": 1024, "target_width": 1024, "target_height": 1024}]]
             for c in (pos, neg)]   # prompts encoded at 1024 px (CLIPTextEncodeSDXL's default), kept as given
    gaps = {"anchored to the base": relative_error(run(anchoring=pu.ANCHOR_BASE), reference),
            "size conditioning as given (1024)": relative_error(run(sized, size_conditioning="as given"), reference),
            "skip residual on the model input": relative_error(run(skip_residual=pu.SKIP_ON_INPUT), reference)}
    print(f"\nSDXL super-resolution from an image: max |ladder - official| / max |official| = {error:.2e}; "
          + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    assert out.shape == reference.shape == (1, 4, 10, 14)
    assert error <= TIGHT
    for what, gap in gaps.items():
        assert gap > 4 * TIGHT, what

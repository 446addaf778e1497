"""The paper's skip residual on the sampler's state (LINFUSION_FACTS.md section 4B), as a ComfyUI SAMPLER.

Before each step from sigma_i the paper pulls the sampler's x towards the reference latent noised to sigma_i
with the stage's own noise:  x = x * (1 - c^s) + (reference + noise * sigma_i) * c^s,  c = cosine_factor(t_i).
A model wrapper cannot do that (it sees one denoiser call, not the sampler's x; see demofusion.py for the
denoiser-input form), so this wraps a k-diffusion sampler function and runs it one step at a time with the
residual applied in between. It is a comfy.samplers.KSAMPLER: comfy.sample.sample_custom and
SamplerCustomAdvanced take it as they take any SAMPLER.

Running a sampler step by step is the same as one call only for samplers that keep no state from one step to
the next (STEPWISE_EXACT); ancestral ones get one noise sampler for the whole run so their noise sequence is
the one-call sequence. Multistep samplers (dpmpp_2m, lms, ...) would restart their history every step.
"""
from __future__ import annotations

import inspect

import torch

from .highres_schedule import COSINE_SCALES, cosine_factor

# Samplers whose one-step-at-a-time run equals their one-call run (single-step methods).
STEPWISE_EXACT = frozenset({"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "ddim", "lcm",
                            "dpmpp_2s_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp"})


def supports_exact_skip_residual(sampler_name: str) -> bool:
    return sampler_name in STEPWISE_EXACT


def noised_reference(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, reference: torch.Tensor):
    """The reference at noise level sigma, noised as the sampler noised the stage's start (eps: ref + n * sigma)."""
    return model_sampling.noise_scaling(sigma, noise, reference)


def recover_noise(model_sampling, sigma0: torch.Tensor, x0: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The noise n with x0 = noise_scaling(sigma0, n, reference), for the linear scalings of eps, v and flow
    models (used when the caller has not handed the noise over, as under SamplerCustomAdvanced)."""
    offset = model_sampling.noise_scaling(sigma0, torch.zeros_like(x0), reference)
    scale = model_sampling.noise_scaling(sigma0, torch.ones_like(x0), torch.zeros_like(reference))
    return (x0 - offset) / scale


def find_model_sampling(model, depth: int = 4):
    """The model_sampling under the sampler's model: ComfyUI hands a sampler function KSamplerX0Inpaint, whose
    inner_model is the CFG guider, whose inner_model is the BaseModel. Walked rather than indexed, as other
    nodes may wrap a level more; a chain without it stops with an error naming what was found."""
    seen, node = [], model
    for _ in range(depth + 1):
        seen.append(type(node).__name__)
        sampling = getattr(node, "model_sampling", None)
        if sampling is not None and callable(getattr(sampling, "timestep", None)):
            return sampling
        node = getattr(node, "inner_model", None)
        if node is None:
            break
    raise RuntimeError(f"[LinFusion] the skip residual sampler found no model_sampling under the model it was "
                       f"given ({' -> '.join(seen)}); it expects ComfyUI's KSamplerX0Inpaint -> CFG guider -> "
                       f"model, as SamplerCustomAdvanced and KSampler build it")


def skip_residual_sampler(sampler_name: str, noise: torch.Tensor | None = None,
                          cosine_scale: float = COSINE_SCALES[0]):
    """A KSAMPLER running `sampler_name` with the skip residual on x before every step. The reference is the
    latent being sampled from (KSamplerX0Inpaint.latent_image, already in the model's latent space); `noise` is
    the stage's noise (the tensor handed to the sampler); without it, it is recovered from the noised start."""
    import comfy.k_diffusion.sampling
    import comfy.samplers

    if not supports_exact_skip_residual(sampler_name):
        raise ValueError(f"the skip residual on the sampler state runs the sampler step by step, exact only for "
                         f"single-step samplers {sorted(STEPWISE_EXACT)}; got {sampler_name!r}")
    inner = comfy.samplers.sampler_object(sampler_name)
    step_function, step_options = inner.sampler_function, dict(inner.extra_options)
    takes_noise_sampler = "noise_sampler" in inspect.signature(step_function).parameters

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        model_sampling = find_model_sampling(model)
        reference = model.latent_image
        if reference is None or len(sigmas) < 2:
            return step_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                 **options)
        reference = reference.to(x)
        n = (noise.to(x) if noise is not None else recover_noise(model_sampling, sigmas[0], x, reference))
        options = {**options}
        if takes_noise_sampler and options.get("noise_sampler") is None:
            # One noise stream for the whole run, as the one-call sampler draws it.
            options["noise_sampler"] = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            c = cosine_factor(model_sampling.timestep(sigma.reshape(1)).float()).to(x.device)
            c1 = (c ** cosine_scale).to(x.dtype)
            if float(c1) > 0.0:
                x = x * (1 - c1) + noised_reference(model_sampling, sigma, n, reference) * c1
            step_callback = None
            if callback is not None:
                step_callback = (lambda d, i=i: callback({**d, "i": d["i"] + i}))
            x = step_function(model, x, sigmas[i:i + 2], extra_args=extra_args, callback=step_callback,
                              disable=True, **options)
        return x

    return comfy.samplers.KSAMPLER(sample, step_options, inner.inpaint_options)

"""The SD 1.5 recipe's own sampler: diffusers' DEISMultistepScheduler on its "leading" grid, in ComfyUI's terms.

The paper's SD 1.5 notebook (ultra_text2image_w_sdedit.ipynb) runs Lykon/dreamshaper-8 with that checkpoint's
scheduler, diffusers' DEISMultistepScheduler (solver_order 2, "logrho", algorithm "deis", lower_order_final,
"leading" spacing with steps_offset 1, scaled_linear betas, epsilon prediction). ComfyUI's own `deis` is another
DEIS (its coefficients come from a different integration), so this writes the diffusers solver out anew.

Conventions. diffusers keeps the variance-preserving sample x_vp = alpha_t x0 + sigma_t eps; ComfyUI samplers keep
the k-diffusion sample x = x_vp / alpha_t = x0 + sigma eps with sigma = sigma_t / alpha_t (the `sigmas` of
ComfyUI's model_sampling, computed from alphas_cumprod). DEIS's variable rho_t = sigma_t / alpha_t is exactly that
sigma, and each DEIS update divided by alpha_t becomes

    x_next = x + sum_j w_j eps_j,   w_j = integral from sigma_i to sigma_next of l_j(log sigma) d sigma,

where eps_j are the noise predictions of this and the previous steps (eps = (x - denoised) / sigma) and l_j the
Lagrange basis in log sigma through those steps' sigmas. First order (one prediction): w = sigma_next - sigma_i,
an Euler/DDIM step. Second order, with sigma_i = b, the previous sigma c and sigma_next = t:
    w_0 = F(t; b, c) - F(b; b, c),  w_1 = F(t; c, b) - F(b; c, b),  F(r; b, c) = r (log r - log c - 1) / (log b - log c),
the antiderivative of (log r - log c) / (log b - log c). diffusers predicts x0 and converts back to eps
(convert_model_output); with thresholding off that round trip is the identity, so eps is used directly.

Order schedule as diffusers' step(): the first step of a run is first order (no history yet), the later ones second
order; with lower_order_final (diffusers: on, but only when the whole schedule has fewer than 15 steps) the last step
is first order too.
"""
from __future__ import annotations

import math

import torch

SOLVER_ORDER = 2
TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1              # the dreamshaper-8 scheduler config's steps_offset
LOWER_ORDER_FINAL_BELOW = 15  # diffusers applies lower_order_final only to schedules shorter than this


def leading_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS, steps_offset: int = STEPS_OFFSET) -> list[int]:
    """diffusers' DEIS/DPM-Solver "leading" timesteps for a steps-step schedule, noisiest first:
    ratio = train_timesteps // (steps + 1), t_k = k * ratio + steps_offset for k = steps .. 1.
    (Note the + 1: the Euler scheduler's "leading" spacing divides by steps instead.) 50 steps: 951, 932, ..., 20."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ratio = train_timesteps // (steps + 1)
    if ratio < 1:
        raise ValueError(f"{steps} steps do not fit in {train_timesteps} training timesteps")
    return [k * ratio + steps_offset for k in range(steps, 0, -1)]


def img2img_steps(base_steps: int, strength: float) -> int:
    """Steps the SD 1.5 img2img pipeline runs: init_timestep = int(base_steps * strength) (truncated; float-safe)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    return min(int(round(base_steps * strength, 9)), base_steps)


def leading_sigmas(model_sampling, steps: int, denoise_steps: int | None = None) -> torch.Tensor:
    """ComfyUI sigmas of diffusers' leading grid: sigma(t) at each leading timestep, then sigma(0) (diffusers' DEIS
    ends on the smallest training sigma, not on 0). denoise_steps keeps the last denoise_steps steps (img2img's
    truncation; None: all). model_sampling: a discrete (1000-timestep) ComfyUI model_sampling."""
    table = getattr(model_sampling, "sigmas", None)
    if table is None or table.ndim != 1 or len(table) < 2:
        raise ValueError("the leading (diffusers DEIS) grid needs a discrete-timestep model (SD 1.x/2.x, SDXL); this "
                         f"model's sampling ({type(model_sampling).__name__}) has no timestep table")
    timesteps = leading_timesteps(steps, len(table))
    if denoise_steps is not None:
        if not 1 <= denoise_steps <= steps:
            raise ValueError(f"denoise_steps must lie in 1..{steps}, got {denoise_steps}")
        timesteps = timesteps[steps - denoise_steps:]
    sigmas = table.float().cpu()
    return torch.cat([sigmas[timesteps], sigmas[:1]])


def _antiderivative(r: float, b: float, c: float) -> float:
    """F(r; b, c) = r (log r - log c - 1) / (log b - log c); F(0) = 0 (its limit), for a run that ends at sigma 0."""
    if r == 0.0:
        return 0.0
    return r * (math.log(r) - math.log(c) - 1.0) / (math.log(b) - math.log(c))


def deis_weights(sigma_next: float, sigma: float, sigma_prev: float | None) -> tuple[float, ...]:
    """The weights of the eps predictions (this step's first) in one DEIS step from sigma to sigma_next: first order
    without sigma_prev, else second order (logrho). Computed in float64."""
    if sigma_prev is None:
        return (sigma_next - sigma,)
    w0 = _antiderivative(sigma_next, sigma, sigma_prev) - _antiderivative(sigma, sigma, sigma_prev)
    w1 = _antiderivative(sigma_next, sigma_prev, sigma) - _antiderivative(sigma, sigma_prev, sigma)
    return (w0, w1)


@torch.no_grad()
def sample_deis_diffusers(model, x, sigmas, extra_args=None, callback=None, disable=None, lower_order_final=False):
    """k-diffusion sampler function: diffusers' 2nd-order logrho DEIS over `sigmas` (see the module docstring)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    levels = [float(s) for s in sigmas]
    previous_eps = None
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma == 0.0:   # nothing left to remove
            x = denoised
            continue
        eps = (x - denoised) / sigma
        first_order = previous_eps is None or (lower_order_final and i == steps - 1)
        weights = deis_weights(sigma_next, sigma, None if first_order else levels[i - 1])
        x = x + weights[0] * eps
        if len(weights) > 1:
            x = x + weights[1] * previous_eps
        previous_eps = eps
    return x


def deis_sampler(lower_order_final: bool = False):
    """The SAMPLER (comfy.samplers.KSAMPLER) for sample_custom / SamplerCustomAdvanced. lower_order_final: make the
    last step first order, as diffusers does when the full schedule has fewer than 15 steps."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_deis_diffusers, {"lower_order_final": bool(lower_order_final)})


def lower_order_final_for(base_steps: int) -> bool:
    """diffusers' rule for the dreamshaper-8 config (lower_order_final true): only for schedules under 15 steps."""
    return base_steps < LOWER_ORDER_FINAL_BELOW

"""DemoFusion-style refinement of one upscale stage (LINFUSION_FACTS.md section 4B/4C), as a model wrapper.

Each denoiser call at noise level sigma (timestep t, c = cosine_factor(t)):
  skip residual   x' = x * (1 - c^3) + reference_t * c^3        (reference noised to sigma, fixed noise)
  branch 1        D1 = D(x')
  branch 2        D2 = D(blur(x')) with every Conv2d dilated by the stage ratio, taken relative to x'
  output          (1 - c) * D1 + c * D2

Why in denoised space: a ComfyUI sampler owns x, a model wrapper only sees one call. Mixing the branches'
denoised outputs is exactly the paper's mix of their scheduler steps (a DDIM/Euler step is linear in the
prediction for a fixed x).

The skip residual has two forms. The paper applies it to the sampler's state x before each step; that needs
the sampler loop (linfusion_core.highres.skip_residual_sampler, used by the Progressive Upscale node). A model wrapper
alone, as in a hand-built KSampler graph, can only apply it to the denoiser's view of x, as ComfyUI's own
inpainting (KSamplerX0Inpaint) blends its reference: the prediction is the paper's, but the sampler's x keeps
(x - x') * sigma_next / sigma of the difference, carried into later steps by (1 - c^3) each. Negligible at the
paper's strengths (c^3 < 0.01 at t <= 301), material from strength ~0.6 on. skip_residual=False leaves the
residual to such a sampler.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from .highres_schedule import COSINE_SCALES, blur_kernel_size, blur_sigma, cosine_factor
from .latent_filters import blur_restandardised

log = logging.getLogger("LinFusion")


@contextlib.contextmanager
def dilated_convs(module: torch.nn.Module, ratio: int):
    """Multiply dilation and padding of every spatial Conv2d in `module` by `ratio`; restore on exit, also on
    an exception or an interruption. 1x1 convolutions are left alone (dilation does nothing to them).
    With padding scaled with the dilation a 3x3 conv keeps its output size, so the UNet's shapes are unchanged."""
    saved = []
    try:
        if ratio > 1:
            for m in module.modules():
                if (isinstance(m, torch.nn.Conv2d) and isinstance(m.padding, tuple)
                        and any(k > 1 for k in m.kernel_size)):
                    saved.append((m, m.dilation, m.padding))
                    m.dilation = tuple(d * ratio for d in m.dilation)
                    m.padding = tuple(p * ratio for p in m.padding)
        yield len(saved)
    finally:
        for m, dilation, padding in saved:
            m.dilation, m.padding = dilation, padding


def skip_residual(x: torch.Tensor, reference_t: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """x * (1 - c1) + reference_t * c1, c1 per sample (B) broadcast over C x H x W."""
    c1 = c1.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return x * (1 - c1) + reference_t * c1


def demofusion_denoise(denoise, denoise_dilated, x: torch.Tensor, timestep: torch.Tensor,
                       reference_t: torch.Tensor | None, ratio: int,
                       cosine_scales=COSINE_SCALES, sigma: float = 0.8, blur_padding: str = "zeros") -> torch.Tensor:
    """One DemoFusion-style denoiser evaluation. denoise(x) and denoise_dilated(x) return the denoised
    prediction (x0) of the plain and the dilated model; timestep is the model timestep per sample (B).
    blur_padding "zeros" is the paper's blur, "reflect" keeps the latent's edges from darkening."""
    c = cosine_factor(timestep.float())
    c1, c2, c3 = (c ** s for s in cosine_scales)
    if reference_t is not None:
        x = skip_residual(x, reference_t, c1)
    d1 = denoise(x)
    if ratio <= 1 or float(c2.max()) <= 0.0:
        return d1
    # One sigma per call in practice (cond and uncond share it): the kernel is a scalar property.
    xb = blur_restandardised(x, blur_kernel_size(ratio), float(blur_sigma(c3[0], sigma)), blur_padding)
    # The dilated branch predicts from the blurred latent; rebase its prediction on x so that its implied
    # noise (x - D) / sigma is the blurred branch's, as the paper's step from x with branch 2's noise.
    d2 = denoise_dilated(xb) + (x - xb)
    c2 = c2.view(-1, *([1] * (x.ndim - 1))).to(d1.dtype)
    return d1 * (1 - c2) + d2 * c2


class DemoFusionWrapper:
    """A WrappersMP.APPLY_MODEL wrapper: ComfyUI calls it in place of BaseModel.apply_model with the executor
    of the rest of the chain, so other wrappers (and model_function_wrapper) keep working around and
    inside it. It holds only the reference latent and numbers; the model is touched solely inside
    dilated_convs for the branch-2 call."""

    def __init__(self, reference: torch.Tensor | None, ratio: int, seed: int = 0,
                 cosine_scales=COSINE_SCALES, sigma: float = 0.8, skip_residual: bool = True,
                 blur_padding: str = "zeros"):
        self.reference = reference  # in the model's latent space (process_latent_in already applied)
        self.ratio = int(ratio)
        self.seed = int(seed)
        self.cosine_scales = tuple(float(s) for s in cosine_scales)
        self.sigma = float(sigma)
        self.use_skip_residual = skip_residual and reference is not None
        self.blur_padding = blur_padding
        self._noise = None

    def _reference_like(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.reference
        if ref.shape[-2:] != x.shape[-2:]:
            log.warning("[LinFusion] DemoFusion reference latent %s resized to the sampled latent %s",
                        tuple(ref.shape[-2:]), tuple(x.shape[-2:]))
            ref = F.interpolate(ref.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
            self.reference = ref
        return ref.to(device=x.device, dtype=x.dtype)

    def _fixed_noise(self, ref: torch.Tensor) -> torch.Tensor:
        # One noise for all steps (the paper keeps noised copies of one reference), drawn on the CPU so the
        # seed gives the same result on every device.
        if self._noise is None or self._noise.shape != ref.shape:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            self._noise = torch.randn(ref.shape, generator=g, dtype=torch.float32)
        return self._noise.to(device=ref.device, dtype=ref.dtype)

    def noised_reference(self, model_sampling, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ref = self._reference_like(x)
        noise = self._fixed_noise(ref)
        # x holds cond and uncond chunks of the same images one after the other: tile the reference alike.
        reps = x.shape[0] // ref.shape[0] if x.shape[0] % ref.shape[0] == 0 else None
        if reps is None:
            ref, noise = ref[:1].expand_as(x), noise[:1].expand_as(x)
        elif reps > 1:
            ref, noise = ref.repeat(reps, 1, 1, 1), noise.repeat(reps, 1, 1, 1)
        return model_sampling.noise_scaling(sigma, noise, ref).to(x.dtype)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        import comfy.model_management

        base_model = executor.class_obj
        model_sampling = base_model.model_sampling
        timestep = model_sampling.timestep(t).float()

        def denoise(inp):
            return executor(inp, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def denoise_dilated(inp):
            # The branch-2 call is a full UNet evaluation: give the user a chance to cancel before it.
            comfy.model_management.throw_exception_if_processing_interrupted()
            with dilated_convs(base_model.diffusion_model, self.ratio):
                return denoise(inp)

        reference_t = self.noised_reference(model_sampling, t, x) if self.use_skip_residual else None
        return demofusion_denoise(denoise, denoise_dilated, x, timestep, reference_t, self.ratio,
                                  self.cosine_scales, self.sigma, self.blur_padding)


def native_long_side(base_model) -> int:
    """Training resolution of the model family: 1024 px for SDXL-like latents, 512 otherwise (SD 1.x/2.x)."""
    import comfy.latent_formats

    return 1024 if isinstance(base_model.latent_format, comfy.latent_formats.SDXL) else 512

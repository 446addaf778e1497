"""The progressive ("SDEdit ladder") upscale loop (LINFUSION_FACTS.md section 4A/4B).

Each stage: decode -> x2 in pixel space (bicubic, or an upscale model) -> encode, or a bicubic latent resize
(vae_codec.VaeCodec.to_stage: the exact VAE, tiled when it would not fit), then img2img
through ComfyUI's own sampling (comfy.sample.sample_custom, what SamplerCustom runs), so LoRA, ControlNet (its hint is
resized by ComfyUI to each stage's latent), hooks and every model patch apply to every stage.
The sampled sigmas are the last `steps + 1` of the base_steps schedule: the paper's img2img, where
ComfyUI's denoise would round int(steps / denoise) down (16 / 0.32 -> 49 steps). With euler + ddim_uniform
they are the SDXL pipelines' grid (Euler, "leading" spacing: t = 301, 281, ..., 1 at strength 0.32 of 50 steps);
the SD 1.5 notebook's is diffusers' DEIS on its own leading grid (deis_sampler.py), the sd15 ladder's default.

Per stage, as the paper's pipelines do: SDXL size conditioning (sdxl_size.py), the DemoFusion refinement with
its skip residual on the sampler state (skip_residual_sampler.py), and the latent re-normalised to the base
latent's (high-res pipeline) or its own input's (super-resolution pipeline) per-channel mean/std.
One progress bar covers the whole job (progress.py): every sampling step and every VAE pass is a unit, and
tiled UNet calls and tiled VAE passes move it per tile.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .. import progress
from .demofusion import DemoFusionWrapper, native_long_side
from . import deis_sampler
from .highres_schedule import (ANCHOR_AUTO, ANCHOR_BASE, ANCHOR_INPUT, ANCHOR_OFF, ANCHORINGS,  # noqa: F401
                               DEIS_SAMPLER, FOLLOW_LADDER, LADDER_RECIPES, LEADING_SCHEDULER, Stage,
                               super_resolution_ratio)
from .latent_filters import channel_stats, match_stats
from .pixel_upscale import resize_image  # noqa: F401  (kept importable here)
from .vae_codec import VaeCodec, resize_latent  # noqa: F401
from .sdxl_size import SIZE_FINAL, stage_conditioning
from .skip_residual_sampler import skip_residual_sampler, supports_exact_skip_residual

log = logging.getLogger("LinFusion")

DEMOFUSION_WRAPPER_KEY = "linfusion_demofusion"

# Mean/std anchoring after every stage (before it is decoded and upscaled for the next): ANCHOR_* (highres_schedule).

# Where the DemoFusion skip residual acts.
SKIP_ON_STATE = "sampler state (paper)"
SKIP_ON_INPUT = "model input"
SKIP_RESIDUAL_FORMS = (SKIP_ON_STATE, SKIP_ON_INPUT)


def resolve_anchoring(anchoring, ladder: str) -> str:
    """The anchoring a run uses. "paper" follows the ladder: the SDXL (DemoFusion) ladder anchors every stage to
    the base, the SD 1.5 SDEdit notebook does not anchor. A boolean is the former `anchor_stats` input of saved
    workflows: True (anchor to the base) or False (off)."""
    if isinstance(anchoring, bool) or anchoring in ("true", "false", "True", "False"):
        return ANCHOR_BASE if anchoring in (True, "true", "True") else ANCHOR_OFF
    if anchoring not in ANCHORINGS:
        raise ValueError(f"anchoring must be one of {ANCHORINGS}, got {anchoring!r}")
    if anchoring == ANCHOR_AUTO:
        return ANCHOR_BASE if ladder == "sdxl" else ANCHOR_OFF
    return anchoring


def resolve_sampling(sampler_name: str, scheduler: str, ladder: str) -> tuple[str, str]:
    """(sampler, scheduler) a run uses: "paper (follows ladder)" is the ladder's recipe (sd15: diffusers' DEIS on
    its leading grid, as the SD 1.5 notebook; sdxl: euler + ddim_uniform, the SDXL pipelines' Euler grid)."""
    recipe = LADDER_RECIPES[ladder]
    return (recipe.sampler if sampler_name == FOLLOW_LADDER else sampler_name,
            recipe.scheduler if scheduler == FOLLOW_LADDER else scheduler)


def stage_sigmas(model, sampler_name: str, scheduler: str, base_steps: int, steps: int) -> torch.Tensor:
    """The last steps + 1 sigmas of the base_steps schedule: ComfyUI's for its schedulers, or diffusers' leading
    DEIS grid (deis_sampler.leading_sigmas) for LEADING_SCHEDULER."""
    import comfy.samplers

    if scheduler == LEADING_SCHEDULER:
        return deis_sampler.leading_sigmas(model.get_model_object("model_sampling"), base_steps, steps)
    if sampler_name == DEIS_SAMPLER:
        sampler_name = "euler"   # ComfyUI's schedulers do not depend on the sampler but for a few named ones
    full = comfy.samplers.KSampler(model, steps=base_steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
    return full[-(steps + 1):]


def stage_sampler(sampler_name: str, exact_skip_residual: bool, noise: torch.Tensor, base_steps: int = 50):
    """The SAMPLER of one stage: ComfyUI's own, diffusers' DEIS (deis_sampler.py), or wrapped to apply the skip
    residual to its state."""
    import comfy.samplers

    if sampler_name == DEIS_SAMPLER:
        return deis_sampler.deis_sampler(lower_order_final=deis_sampler.lower_order_final_for(base_steps))
    if exact_skip_residual:
        return skip_residual_sampler(sampler_name, noise=noise)
    return comfy.samplers.sampler_object(sampler_name)


def with_demofusion(model, reference: torch.Tensor, ratio: int, seed: int, **options):
    """A clone of the ModelPatcher with the DemoFusion wrapper for one stage (reference in VAE latent space)."""
    import comfy.patcher_extension

    m = model.clone()
    ref = m.model.process_latent_in(reference.float())
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEMOFUSION_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEMOFUSION_WRAPPER_KEY,
                           DemoFusionWrapper(ref, ratio, seed, **options))
    return m


def _needs_base_latent(latent_upscale: bool, anchoring: str) -> bool:
    """Whether a ladder started from an image must encode it as such: to resize it as a latent, or for the stats
    of anchoring to the base. Otherwise the first stage resizes the image itself (the paper's super-resolution)."""
    return latent_upscale or anchoring == ANCHOR_BASE


def _work_units(model, positive, negative, codec: VaeCodec, samples, stages: Sequence[Stage], *,
                latent_upscale: bool = False, keep_images: bool = False, anchoring: str = ANCHOR_OFF, **_) -> int:
    """The ladder's progress units: every sampling step and every VAE pass (and upscale-model pass)."""
    from_image = samples is None
    return sum(s.steps for s in stages) + codec.units(
        len(stages), latent_upscale, keep_images, from_image and _needs_base_latent(latent_upscale, anchoring),
        from_pixels=from_image)


@progress.one_bar(_work_units)
def progressive_upscale(model, positive, negative, codec: VaeCodec, samples: torch.Tensor | None,
                        stages: Sequence[Stage], *, seed: int, cfg: float, sampler_name: str, scheduler: str,
                        base_steps: int, latent_upscale: bool = False, demofusion: bool = False,
                        anchoring: str = ANCHOR_OFF, size_conditioning: str = SIZE_FINAL,
                        skip_residual: str = SKIP_ON_STATE, blur_padding: str = "zeros", keep_images: bool = False,
                        on_stage: Callable[[Stage, torch.Tensor], None] | None = None,
                        base_image: torch.Tensor | None = None):
    """Run the ladder from `samples` (the base stage latent; None: from `base_image`, which the first stage resizes
    itself, encoded only where the base latent is needed: latent upscale, anchoring to the base).
    Returns (final latent, stage images), the stage images (decoded base and every stage) only when
    keep_images. anchoring is ANCHOR_BASE, ANCHOR_INPUT or ANCHOR_OFF (resolve_anchoring first),
    size_conditioning one of sdxl_size.SIZE_CONDITIONINGS, skip_residual one of SKIP_RESIDUAL_FORMS (used with
    demofusion)."""
    import comfy.model_management
    import comfy.sample

    if anchoring not in (ANCHOR_BASE, ANCHOR_INPUT, ANCHOR_OFF):
        raise ValueError(f"anchoring must be resolved to one of {ANCHOR_BASE!r}, {ANCHOR_INPUT!r}, {ANCHOR_OFF!r}, "
                         f"got {anchoring!r}")
    if skip_residual not in SKIP_RESIDUAL_FORMS:
        raise ValueError(f"skip_residual must be one of {SKIP_RESIDUAL_FORMS}, got {skip_residual!r}")
    exact_skip_residual = demofusion and skip_residual == SKIP_ON_STATE
    if exact_skip_residual and not supports_exact_skip_residual(sampler_name):
        log.warning("[LinFusion] %s is a multistep sampler: the skip residual acts on the model input instead of "
                    "the sampler state (exact only for single-step samplers such as euler)", sampler_name)
        exact_skip_residual = False
    job = progress.current()
    pixels = None
    if samples is None:
        if _needs_base_latent(latent_upscale, anchoring):
            samples = codec.encode(base_image)
        if not latent_upscale:
            pixels = base_image   # the first stage resizes the image itself, as the paper's super-resolution
    base_mean, base_std = channel_stats(samples) if anchoring == ANCHOR_BASE else (None, None)
    final_size = (stages[-1].width, stages[-1].height)
    images = []
    for stage in stages:
        comfy.model_management.throw_exception_if_processing_interrupted()
        samples = codec.to_stage(samples, stage.width, stage.height, latent_upscale, images if keep_images else None,
                                 pixels=pixels)
        pixels = None
        input_stats = channel_stats(samples) if anchoring == ANCHOR_INPUT else None
        stage_model = model
        if demofusion:
            # Dilation = how far this stage is beyond what the model was trained at: its scale over the base,
            # and at least ceil(long side / native long side) (section 4C, for a large input image).
            ratio = max(stage.ratio, super_resolution_ratio(stage.width, stage.height, native_long_side(model.model)))
            stage_model = with_demofusion(model, samples, ratio, seed + stage.index,
                                          skip_residual=not exact_skip_residual, blur_padding=blur_padding)
        noise = comfy.sample.prepare_noise(samples, seed + stage.index)
        sigmas = stage_sigmas(stage_model, sampler_name, scheduler, base_steps, stage.steps)
        sampler = stage_sampler(sampler_name, exact_skip_residual, noise, base_steps)
        stage_positive, stage_negative = (
            stage_conditioning(model.model, c, size_conditioning, (stage.width, stage.height), final_size)
            for c in (positive, negative))
        offset = job.position

        def callback(step, x0, x, total_steps, offset=offset):
            job.advance_to(offset + step + 1)   # also where a cancel between steps lands

        log.info("[LinFusion] upscale stage %d/%d: %dx%d px, strength %.3g, %d steps", stage.index, len(stages),
                 stage.width, stage.height, stage.strength, stage.steps)
        samples = comfy.sample.sample_custom(stage_model, noise, cfg, sampler, sigmas, stage_positive, stage_negative,
                                             samples, callback=callback, disable_pbar=True, seed=seed + stage.index)
        if anchoring == ANCHOR_BASE:
            samples = match_stats(samples, base_mean, base_std)
        elif anchoring == ANCHOR_INPUT:
            samples = match_stats(samples, *input_stats)
        job.advance_to(offset + stage.steps)
        if on_stage is not None:
            on_stage(stage, samples)
    if keep_images:
        images.append(codec.decode(samples))
    log.info("[LinFusion] ladder VAE passes: %s", ", ".join(f"{what} {how}" for what, how in codec.passes))
    return samples, images

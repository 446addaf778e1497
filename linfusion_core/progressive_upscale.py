"""The progressive ("SDEdit ladder") upscale loop (LINFUSION_FACTS.md section 4A/4B).

Each stage: decode -> x2 in pixel space (bicubic, or an upscale model) -> encode, or a bicubic latent resize
(vae_codec.VaeCodec.to_stage: the exact VAE, tiled when it would not fit), then img2img
through ComfyUI's own sampling (comfy.sample.sample, the KSampler path), so LoRA, ControlNet (its hint is
resized by ComfyUI to each stage's latent), hooks and every model patch apply to every stage.
The sampled sigmas are the last `steps + 1` of the base_steps schedule: the paper's img2img, where
ComfyUI's denoise would round int(steps / denoise) down (16 / 0.32 -> 49 steps).
One progress bar covers the whole job (progress.py): every sampling step and every VAE pass is a unit, and
tiled UNet calls and tiled VAE passes move it per tile.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from . import progress
from .demofusion import DemoFusionWrapper, native_long_side
from .highres_schedule import Stage, super_resolution_ratio
from .latent_filters import channel_stats, match_stats
from .pixel_upscale import resize_image  # noqa: F401  (kept importable here)
from .vae_codec import VaeCodec, resize_latent  # noqa: F401

log = logging.getLogger("LinFusion")

DEMOFUSION_WRAPPER_KEY = "linfusion_demofusion"


def stage_sigmas(model, sampler_name: str, scheduler: str, base_steps: int, steps: int) -> torch.Tensor:
    """The last steps + 1 sigmas of ComfyUI's base_steps schedule for this sampler and scheduler."""
    import comfy.samplers

    full = comfy.samplers.KSampler(model, steps=base_steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
    return full[-(steps + 1):]


def with_demofusion(model, reference: torch.Tensor, ratio: int, seed: int, **options):
    """A clone of the ModelPatcher with the DemoFusion wrapper for one stage (reference in VAE latent space)."""
    import comfy.patcher_extension

    m = model.clone()
    ref = m.model.process_latent_in(reference.float())
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEMOFUSION_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEMOFUSION_WRAPPER_KEY,
                           DemoFusionWrapper(ref, ratio, seed, **options))
    return m


def _work_units(model, positive, negative, codec: VaeCodec, samples, stages: Sequence[Stage], *,
                latent_upscale: bool = False, keep_images: bool = False, **_) -> int:
    """The ladder's progress units: every sampling step and every VAE pass (and upscale-model pass)."""
    return sum(s.steps for s in stages) + codec.units(len(stages), latent_upscale, keep_images, samples is None)


@progress.one_bar(_work_units)
def progressive_upscale(model, positive, negative, codec: VaeCodec, samples: torch.Tensor | None,
                        stages: Sequence[Stage], *, seed: int, cfg: float, sampler_name: str, scheduler: str,
                        base_steps: int, latent_upscale: bool = False, demofusion: bool = False,
                        anchor_stats: bool = False, keep_images: bool = False,
                        on_stage: Callable[[Stage, torch.Tensor], None] | None = None,
                        base_image: torch.Tensor | None = None):
    """Run the ladder from `samples` (the base stage latent; None: encode `base_image` first, inside the job).
    Returns (final latent, stage images), the stage images (decoded base and every stage) only when
    keep_images."""
    import comfy.model_management
    import comfy.sample

    job = progress.current()
    if samples is None:
        samples = codec.encode(base_image)
    base_mean, base_std = channel_stats(samples)
    images = []
    for stage in stages:
        comfy.model_management.throw_exception_if_processing_interrupted()
        samples = codec.to_stage(samples, stage.width, stage.height, latent_upscale, images if keep_images else None)
        stage_model = model
        if demofusion:
            # Dilation = how far this stage is beyond what the model was trained at: its scale over the base,
            # and at least ceil(long side / native long side) (section 4C, for a large input image).
            ratio = max(stage.ratio, super_resolution_ratio(stage.width, stage.height, native_long_side(model.model)))
            stage_model = with_demofusion(model, samples, ratio, seed + stage.index)
        noise = comfy.sample.prepare_noise(samples, seed + stage.index)
        sigmas = stage_sigmas(stage_model, sampler_name, scheduler, base_steps, stage.steps)
        offset = job.position

        def callback(step, x0, x, total_steps, offset=offset):
            job.advance_to(offset + step + 1)   # also where a cancel between steps lands

        log.info("[LinFusion] upscale stage %d/%d: %dx%d px, strength %.3g, %d steps", stage.index, len(stages),
                 stage.width, stage.height, stage.strength, stage.steps)
        samples = comfy.sample.sample(stage_model, noise, stage.steps, cfg, sampler_name, scheduler, positive,
                                      negative, samples, sigmas=sigmas, callback=callback, disable_pbar=True,
                                      seed=seed + stage.index)
        job.advance_to(offset + stage.steps)
        if on_stage is not None:
            on_stage(stage, samples)
    if anchor_stats:
        samples = match_stats(samples, base_mean, base_std)
    if keep_images:
        images.append(codec.decode(samples))
    log.info("[LinFusion] ladder VAE passes: %s", ", ".join(f"{what} {how}" for what, how in codec.passes))
    return samples, images

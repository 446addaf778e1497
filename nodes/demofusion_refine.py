"""LinFusion DemoFusion Refine: a MODEL patch for refining an upscaled latent with any sampler node, and the
final mean/std anchoring. The math lives in linfusion_core.highres.demofusion / latent_filters."""
import math

from ..linfusion_core.highres.demofusion import native_long_side
from ..linfusion_core.highres.latent_filters import channel_stats, match_stats
from ..linfusion_core.highres.progressive_upscale import with_demofusion


class LinFusionDemoFusion:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch. Other wrappers and patches on it keep working."}),
                "reference": ("LATENT", {"tooltip": "The upscaled latent this stage refines (also the latent you "
                                                    "sample from, at denoise = the stage strength)."}),
                "dilation_ratio": ("INT", {"default": 0, "min": 0, "max": 64,
                                           "tooltip": "Dilation of every Conv2d in the global branch: the scale of "
                                                      "this stage over the model's native size (2/4/8/16). 0: "
                                                      "ceil(long side / native long side), 512 SD 1.x/2.x, 1024 SDXL."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the fixed noise that noises the reference at every step."}),
                "skip_residual": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Pull the sample towards the noised reference early on (weight c^3). Here, as a "
                               "MODEL patch, it acts on the denoiser's input only (the model-input form): the "
                               "paper applies it to the sampler's state, which only a sampler can do. The two "
                               "differ by a share carried (1 - c^3) per step: negligible at the paper's strengths "
                               "(<= 0.32), material from ~0.6. For the exact form turn this off and sample with "
                               "LinFusion Skip Residual Sampler (SamplerCustomAdvanced), or use LinFusion "
                               "Progressive Upscale (skip_residual 'sampler state (paper)')."}),
                "blur_sigma": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 4.0, "step": 0.05,
                                         "tooltip": "Gaussian sigma of the global branch's input blur (paper 0.8-1.0)."}),
                "cosine_scale_1": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                             "tooltip": "Exponent of c for the skip residual."}),
                "cosine_scale_2": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                             "tooltip": "Exponent of c for the dilated (global) branch blend."}),
                "cosine_scale_3": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                             "tooltip": "Exponent of c for the blur strength."}),
            },
            "optional": {
                "blur_padding": (["zeros (paper)", "reflect"], {
                    "default": "zeros (paper)",
                    "tooltip": "Border handling of the global branch's Gaussian blur. 'zeros' is the paper's; "
                               "'reflect' keeps the latent's edges from darkening in that branch."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with DemoFusion-style refinement; use it in KSampler / SamplerCustomAdvanced.",)
    FUNCTION = "patch"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("DemoFusion-style refinement of an upscaled latent: skip residual to the noised reference and a "
                   "dilated-convolution global branch, blended by a cosine schedule. A MODEL patch, removed with it. "
                   "For the paper's recipe per stage: KSampler (euler, ddim_uniform, denoise = stage strength, the "
                   "same seed as here), then LinFusion Match Latent Mean/Std to the base latent.")

    def patch(self, model, reference, dilation_ratio, seed, skip_residual, blur_sigma,
              cosine_scale_1, cosine_scale_2, cosine_scale_3, blur_padding="zeros (paper)"):
        samples = reference["samples"]
        if dilation_ratio == 0:
            long_side = max(samples.shape[-2:]) * 8
            dilation_ratio = max(1, math.ceil(long_side / native_long_side(model.model)))
        return (with_demofusion(model, samples, dilation_ratio, seed, skip_residual=skip_residual,
                                sigma=blur_sigma, cosine_scales=(cosine_scale_1, cosine_scale_2, cosine_scale_3),
                                blur_padding="reflect" if blur_padding == "reflect" else "zeros"),)


class LinFusionMatchLatentStats:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The refined high-resolution latent."}),
                "reference": ("LATENT", {"tooltip": "The base stage latent whose per-channel mean/std to restore."}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent with the reference's per-channel mean and std (against colour drift).",)
    FUNCTION = "match"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("Re-normalise a latent to another latent's per-channel mean/std. The paper's SDXL recipe does this "
                   "at the end of every stage, to the base latent (its super-resolution pipeline: to the stage's "
                   "own upscaled input).")

    def match(self, latent, reference):
        mean, std = channel_stats(reference["samples"])
        if mean.shape[0] not in (1, latent["samples"].shape[0]):
            mean, std = mean[:1], std[:1]
        out = latent.copy()
        out["samples"] = match_stats(latent["samples"], mean, std)
        return (out,)


NODE_CLASS_MAPPINGS = {"LinFusionDemoFusion": LinFusionDemoFusion,
                       "LinFusionMatchLatentStats": LinFusionMatchLatentStats}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionDemoFusion": "LinFusion DemoFusion Refine",
                              "LinFusionMatchLatentStats": "LinFusion Match Latent Mean/Std"}

"""LinFusion Skip Residual Sampler: the paper's skip residual on the sampler's state, as a SAMPLER for
SamplerCustomAdvanced (engine in linfusion_core.highres.skip_residual_sampler)."""
from ..linfusion_core.highres.highres_schedule import COSINE_SCALES
from ..linfusion_core.highres.skip_residual_sampler import STEPWISE_EXACT, skip_residual_sampler


class LinFusionSkipResidualSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sampler_name": (sorted(STEPWISE_EXACT), {
                    "default": "euler",
                    "tooltip": "The sampler run step by step (single-step samplers only: for them a step-by-step "
                               "run equals a one-call run). Paper: euler, with the ddim_uniform scheduler."}),
                "cosine_scale_1": ("FLOAT", {"default": COSINE_SCALES[0], "min": 0.0, "max": 10.0, "step": 0.1,
                                             "tooltip": "Exponent of c for the skip residual (paper: 3)."}),
            }
        }

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustomAdvanced that pulls the sampler's x towards the noised latent "
                       "it samples from before every step, exactly as the paper.",)
    FUNCTION = "get_sampler"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("The paper's DemoFusion skip residual in its exact form: x = x(1 - c^3) + (reference + noise * "
                   "sigma) c^3 on the sampler's state before every step, the reference being the latent the "
                   "sampler starts from and the noise the one it was noised with. Use it with SamplerCustomAdvanced "
                   "and LinFusion DemoFusion Refine with skip_residual off (the patch then does only the dilated "
                   "branch); with skip_residual on, the residual would be applied twice.")

    def get_sampler(self, sampler_name, cosine_scale_1):
        return (skip_residual_sampler(sampler_name, cosine_scale=cosine_scale_1),)


NODE_CLASS_MAPPINGS = {"LinFusionSkipResidualSampler": LinFusionSkipResidualSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionSkipResidualSampler": "LinFusion Skip Residual Sampler (exact)"}

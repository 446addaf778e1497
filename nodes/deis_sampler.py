"""The SD 1.5 recipe's sampler and grid for SamplerCustomAdvanced graphs: diffusers' DEIS (the scheduler of the
paper's SD 1.5 checkpoint, Lykon/dreamshaper-8) and its "leading" sigmas (engine in linfusion_core.highres.deis_sampler)."""
from ..linfusion_core.highres.deis_sampler import deis_sampler, img2img_steps, leading_sigmas, lower_order_final_for
from ..linfusion_core.highres.highres_schedule import PAPER_BASE_STEPS


class LinFusionDEISSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": PAPER_BASE_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "Steps of the full schedule the sigmas come from (the `steps` of LinFusion "
                                             "Leading Sigmas). diffusers makes the last step first order when it is "
                                             "below 15 (lower_order_final); from 15 on every step after the first "
                                             "is second order."}),
            }
        }

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("diffusers' DEISMultistepScheduler (order 2, logrho) as a SAMPLER for SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("The SD 1.5 notebook's sampler: diffusers' second-order DEIS (logrho), the scheduler of "
                   "Lykon/dreamshaper-8, written for ComfyUI's sigmas. ComfyUI's own 'deis' is a different solver. "
                   "Pair it with LinFusion Leading Sigmas for the notebook's timestep grid.")

    def get_sampler(self, steps):
        return (deis_sampler(lower_order_final=lower_order_final_for(steps)),)


class LinFusionLeadingSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose noise schedule (alphas_cumprod) gives the sigmas "
                                               "(SD 1.x/2.x, SDXL: discrete 1000-timestep models)."}),
                "steps": ("INT", {"default": PAPER_BASE_STEPS, "min": 1, "max": 999,
                                  "tooltip": "Steps of a full denoise (the notebook: 50)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "img2img strength: keeps the last int(steps x denoise) steps, as the "
                                                 "SD 1.5 img2img pipeline (0.4 of 50: 20 steps from t = 381)."}),
            }
        }

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("sigma(t) at diffusers' DEIS 'leading' timesteps, then sigma(0), the smallest training sigma "
                       "(where diffusers' DEIS ends; not 0).",)
    FUNCTION = "get_sigmas"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = ("The SD 1.5 notebook's timestep grid: diffusers' 'leading' spacing of its DEIS scheduler (steps_offset "
                   "1, ratio 1000 // (steps + 1): t = 951, 932, ..., 20 for 50 steps), truncated for img2img.")

    def get_sigmas(self, model, steps, denoise):
        kept = img2img_steps(steps, denoise)
        if kept < 1:
            raise ValueError(f"denoise {denoise} of {steps} steps keeps int({steps} x {denoise}) = 0 steps; raise it")
        return (leading_sigmas(model.get_model_object("model_sampling"), steps, kept),)


NODE_CLASS_MAPPINGS = {"LinFusionDEISSampler": LinFusionDEISSampler, "LinFusionLeadingSigmas": LinFusionLeadingSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionDEISSampler": "LinFusion DEIS Sampler (diffusers, paper SD 1.5)",
                              "LinFusionLeadingSigmas": "LinFusion Leading Sigmas (diffusers DEIS, paper SD 1.5)"}

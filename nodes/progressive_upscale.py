"""LinFusion Progressive Upscale: the paper's x2-per-stage SDEdit ladder as one node (engine in
linfusion_core.highres.progressive_upscale; stage arithmetic in linfusion_core.highres.highres_schedule)."""
import comfy.samplers

from ..linfusion_core.highres.highres_schedule import (DEIS_SAMPLER, LEADING_SCHEDULER, PAPER_BASE_STEPS, SAMPLER_AUTO,
                                               SCHEDULER_AUTO, parse_strengths, plan_stages)
from ..linfusion_core.highres.progressive_upscale import (ANCHOR_AUTO, ANCHORINGS, SKIP_ON_STATE, SKIP_RESIDUAL_FORMS,
                                                  progressive_upscale, resolve_anchoring, resolve_sampling)
from ..linfusion_core.highres.sdxl_size import SIZE_CONDITIONINGS, SIZE_FINAL
from ..linfusion_core.highres.vae_codec import AUTO_TILE, VaeCodec

BLUR_PADDINGS = {"zeros (paper)": "zeros", "reflect": "reflect"}


class LinFusionProgressiveUpscale:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model that refines every stage (LinFusion applied or not; "
                                               "LoRA, ControlNet and other patches apply to every stage)."}),
                "positive": ("CONDITIONING", {"tooltip": "Positive conditioning for every stage. A ControlNet hint "
                                                         "in it is resized by ComfyUI to each stage's size."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning for every stage."}),
                "vae": ("VAE", {"tooltip": "VAE used to decode, upscale in pixel space and encode between stages."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": "Seed of the noise; stage s uses seed + s."}),
                "stages": ("INT", {"default": 4, "min": 1, "max": 8,
                                   "tooltip": "Number of x2 stages (4: 1024x512 -> 16384x8192). Ignored when a "
                                              "target width and height are given."}),
                "target_width": ("INT", {"default": 0, "min": 0, "max": 32768, "step": 8,
                                         "tooltip": "Final width in pixels (0: use 'stages'). Stages double until "
                                                    "the last, which lands on the target."}),
                "target_height": ("INT", {"default": 0, "min": 0, "max": 32768, "step": 8,
                                          "tooltip": "Final height in pixels (0: use 'stages')."}),
                "ladder": (["sd15", "sdxl"], {"tooltip": "The paper's recipe. 'sd15' (16K SD 1.5 notebook): strengths "
                                                         "0.4/0.3/0.2/0.1, int(base_steps x strength) steps, "
                                                         "diffusers' DEIS on its leading grid, no anchoring. 'sdxl' "
                                                         "(high-res pipeline): linspace(0.32, 0) "
                                                         "(0.32/0.24/0.16/0.08 for 4 stages), ceil(base_steps x "
                                                         "strength) steps, euler + ddim_uniform, anchoring to the "
                                                         "base. The 'paper (follows ladder)' choices below follow "
                                                         "it."}),
                "strengths": ("STRING", {"default": "", "tooltip": "Comma-separated strength per stage, e.g. "
                                                                  "'0.4, 0.3'. Empty: the ladder's defaults."}),
                "base_steps": ("INT", {"default": PAPER_BASE_STEPS, "min": 1, "max": 1000,
                                       "tooltip": "Steps of a full denoise; a stage runs the last int (sd15) or "
                                                  "ceil (sdxl) of base_steps x strength of them, as the paper's "
                                                  "img2img pipelines (at least 1)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (paper: 7.5 SD 1.5, 5-7.5 SDXL)."}),
                "sampler_name": ([SAMPLER_AUTO, DEIS_SAMPLER] + list(comfy.samplers.KSampler.SAMPLERS), {
                    "default": SAMPLER_AUTO,
                    "tooltip": "Sampler of every stage. 'paper (follows ladder)': sd15 -> '" + DEIS_SAMPLER + "' "
                               "(diffusers' 2nd-order DEIS of the SD 1.5 notebook's checkpoint, Lykon/dreamshaper-8; "
                               "not ComfyUI's 'deis', a different solver), sdxl -> euler (the SDXL pipelines). "
                               "Any other sampler departs from the paper."}),
                "scheduler": ([SCHEDULER_AUTO, LEADING_SCHEDULER] + list(comfy.samplers.KSampler.SCHEDULERS), {
                    "default": SCHEDULER_AUTO,
                    "tooltip": "Timestep grid of every stage. 'paper (follows ladder)': sd15 -> '" + LEADING_SCHEDULER
                               + "' (diffusers' DEIS 'leading' grid: t = 381, 362, ..., 20 at strength 0.4 of 50 "
                               "steps, then sigma(0)), sdxl -> ddim_uniform (with euler the SDXL pipelines' Euler "
                               "grid: t = 301, 281, ..., 1 at strength 0.32)."}),
                "upscale_in": (["pixels", "latent"], {"tooltip": "'pixels': VAE decode, x2 in pixels (bicubic, the "
                                                               "paper's, or the upscale_model), VAE encode. "
                                                               "'latent': bicubic on the latent (no VAE round "
                                                               "trip, softer)."}),
                "demofusion": ("BOOLEAN", {"default": False,
                                           "tooltip": "Refine each stage DemoFusion-style (skip residual to the "
                                                      "upscaled latent + dilated-conv branch), the paper's SDXL recipe."}),
                "anchoring": (list(ANCHORINGS), {
                    "default": ANCHOR_AUTO,
                    "tooltip": "Re-normalise the latent's per-channel mean/std at the end of every stage, before it "
                               "is upscaled for the next (against colour drift). 'to the base': the base latent's "
                               "(paper's SDXL high-res pipeline); 'to its input': the stage's own upscaled input's "
                               "(paper's super-resolution pipeline); 'paper (follows ladder)': 'to the base' for the "
                               "sdxl ladder, off for sd15 (the SD 1.5 notebook does not anchor). Saved workflows "
                               "with the former on/off 'anchor_stats' run as 'to the base' / 'off'."}),
                "vae_tile_size": ("INT", {"default": 0, "min": -1, "max": 4096, "step": 64,
                                          "tooltip": "VAE between stages, always exact (never ComfyUI's blended "
                                                     "tiles). 0 = auto: untiled while it fits in free memory and "
                                                     "the image is small (up to 1 MP on CPU, 4 MP on a GPU, so a "
                                                     f"cancel acts quickly), else the exact tiled VAE with {AUTO_TILE} "
                                                     "px tiles. -1 = always untiled. > 0 = the exact tiled VAE "
                                                     "with tiles of this many pixels (same result as untiled, "
                                                     "memory bounded by the tile)."}),
                "return_stage_images": ("BOOLEAN", {"default": False,
                                                    "tooltip": "Also output the decoded image of the base and every "
                                                               "stage (costs memory, and one extra decode with "
                                                               "'pixels', one decode per stage plus one with "
                                                               "'latent')."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "The base stage latent (e.g. a 1024x512 txt2img result)."}),
                "image": ("IMAGE", {"tooltip": "Or a base image to upscale (encoded with the VAE first)."}),
                "upscale_model": ("UPSCALE_MODEL", {"tooltip": "Optional (Load Upscale Model, e.g. an ESRGAN): "
                                                               "the x2 step in pixel space runs this model, then "
                                                               "resizes to the exact stage size. Without it: "
                                                               "bicubic, as in the paper. Ignored for "
                                                               "upscale_in 'latent'."}),
                "size_conditioning": (list(SIZE_CONDITIONINGS), {
                    "default": SIZE_FINAL,
                    "tooltip": "SDXL only (other models are untouched): the original/target size every stage is "
                               "conditioned on. 'final size (paper)': the last stage's size, as the paper's high-res "
                               "pipeline (condition the base KSampler on it too, e.g. CLIPTextEncodeSDXL "
                               "width/height/target_width/target_height = final size). 'stage size': each stage's "
                               "own size (paper's super-resolution pipeline). 'as given': what the conditioning "
                               "holds, else ComfyUI's default, the stage latent's size."}),
                "skip_residual": (list(SKIP_RESIDUAL_FORMS), {
                    "default": SKIP_ON_STATE,
                    "tooltip": "With demofusion: where the skip residual acts. 'sampler state (paper)': on the "
                               "sampler's x before every step, exactly as the paper (single-step samplers: euler, "
                               "heun, dpm_2, ancestral ones; multistep samplers fall back to 'model input' with a "
                               "warning). 'model input': on the denoiser's input only, as the DemoFusion Refine "
                               "node in a KSampler graph does; differs by a carried (1 - c^3) share per step, "
                               "negligible at the paper's strengths (<= 0.32), material from ~0.6."}),
                "blur_padding": (list(BLUR_PADDINGS), {
                    "default": "zeros (paper)",
                    "tooltip": "With demofusion: border handling of the dilated branch's Gaussian blur. 'zeros' is "
                               "the paper's; 'reflect' keeps the latent's edges from darkening in that branch."}),
            },
        }

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "stage_images")
    OUTPUT_IS_LIST = (False, True)
    OUTPUT_TOOLTIPS = ("The latent of the last stage.", "Decoded base and stage images (empty unless asked).")
    FUNCTION = "upscale"
    CATEGORY = "LinFusion/high-res"
    DESCRIPTION = "Progressive x2 upscale with img2img per stage (SDEdit ladder of the LinFusion paper, up to 16K)."

    @classmethod
    def VALIDATE_INPUTS(cls, anchoring=None):
        # Named here so that ComfyUI hands the value over unchecked: a saved workflow's former boolean
        # 'anchor_stats' sits in this widget's place and still runs (see resolve_anchoring). A prompt without
        # it already gets ComfyUI's own "Required input is missing" error.
        if anchoring is None or anchoring in ANCHORINGS or isinstance(anchoring, bool) or anchoring in ("true", "false"):
            return True
        return f"anchoring must be one of {list(ANCHORINGS)}, got {anchoring!r}"

    def upscale(self, model, positive, negative, vae, seed, stages, target_width, target_height, ladder, strengths,
                base_steps, cfg, sampler_name, scheduler, upscale_in, demofusion, anchoring, vae_tile_size,
                return_stage_images, latent=None, image=None, upscale_model=None, size_conditioning=SIZE_FINAL,
                skip_residual=SKIP_ON_STATE, blur_padding="zeros (paper)"):
        codec = VaeCodec(vae, vae_tile_size, upscale_model=upscale_model)
        grid = 8
        samples = None
        if latent is not None:
            samples = latent["samples"]
            base_w, base_h = samples.shape[-1] * grid, samples.shape[-2] * grid
        elif image is not None:   # encoded inside the ladder's job (its progress bar), cropped as VAE Encode does
            base_w, base_h = image.shape[2] // grid * grid, image.shape[1] // grid * grid
        else:
            raise ValueError("LinFusion Progressive Upscale needs a 'latent' or an 'image' input")
        target = (target_width, target_height) if target_width > 0 and target_height > 0 else None
        if (target_width > 0) != (target_height > 0):
            raise ValueError("give both target_width and target_height, or neither (then 'stages' counts)")
        plan = plan_stages(base_w, base_h, num_stages=None if target else stages, target=target, ladder=ladder,
                           strengths=parse_strengths(strengths), base_steps=base_steps, grid=grid)
        sampler_name, scheduler = resolve_sampling(sampler_name, scheduler, ladder)
        out, images = progressive_upscale(model, positive, negative, codec, samples, plan, seed=seed, cfg=cfg,
                                          sampler_name=sampler_name, scheduler=scheduler, base_steps=base_steps,
                                          latent_upscale=upscale_in == "latent", demofusion=demofusion,
                                          anchoring=resolve_anchoring(anchoring, ladder),
                                          size_conditioning=size_conditioning, skip_residual=skip_residual,
                                          blur_padding=BLUR_PADDINGS[blur_padding], keep_images=return_stage_images,
                                          base_image=image if samples is None else None)
        result = {"samples": out}
        return (result, images)


NODE_CLASS_MAPPINGS = {"LinFusionProgressiveUpscale": LinFusionProgressiveUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"LinFusionProgressiveUpscale": "LinFusion Progressive Upscale (SDEdit ladder)"}

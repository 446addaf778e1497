#!/usr/bin/env python3
"""Write example_workflows/*.json, the graphs ComfyUI shows in its template browser for this extension.

    python3 scripts/comfy_host.py python scripts/example_workflows.py          # (re)write the files
    python3 scripts/comfy_host.py python scripts/example_workflows.py --check  # exit 1 if any is stale

The graphs are described here in a few lines each and laid out by tests/workflow_build.py from the node
definitions of the running host, so the widget order of every node is the node's own. A node gains an
input: run this again (tests/test_workflows.py fails until then). Model names are the file and folder
names users download (see the README's model table).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from workflow_build import NODE_WIDTH, UIGraph  # noqa: E402
from linfusion_core.highres.highres_schedule import RECIPES as PAPER_RECIPES  # noqa: E402  (the one recipe table)

OUT_DIR = REPO / "example_workflows"

SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
LINFUSION_SD15 = "LinFusion-1-5"          # models/linfusion/LinFusion-1-5/{config.json, diffusion_pytorch_model.safetensors}
LINFUSION_SDXL = "LinFusion-XL"
CONTROLNET_CANNY = "control_v11p_sd15_canny_fp16.safetensors"
# A public SD 1.5 style LoRA (27 MB; pixel art, trigger word "PixArFK"), so workflow 6 runs as shipped.
LORA_SD15 = "PixelArtRedmond15V-PixelArt-PIXARFK.safetensors"
INPUT_IMAGE = "example.png"
IPADAPTER_PLUS = "ip-adapter-plus_sd15.safetensors"                  # what the PLUS preset loads
CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"        # ComfyUI_IPAdapter_plus's name for it

MODELS = {   # the frontend offers these downloads when the file is missing
    SD15_CKPT: ("checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                               "v1-5-pruned-emaonly.safetensors?download=true"),
    SDXL_CKPT: ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                               "sd_xl_base_1.0.safetensors?download=true"),
    LORA_SD15: ("loras", "https://huggingface.co/artificialguybr/pixelartredmond-1-5v-pixel-art-loras-for-sd-1-5/"
                         "resolve/main/PixelArtRedmond15V-PixelArt-PIXARFK.safetensors?download=true"),
    CONTROLNET_CANNY: ("controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/"
                                     "resolve/main/control_v11p_sd15_canny_fp16.safetensors?download=true"),
    # The two files ComfyUI_IPAdapter_plus's README lists for the PLUS preset (the vision model is renamed).
    IPADAPTER_PLUS: ("ipadapter", "https://huggingface.co/h94/IP-Adapter/resolve/main/models/"
                                  "ip-adapter-plus_sd15.safetensors?download=true"),
    CLIP_VISION_H: ("clip_vision", "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/"
                                   "model.safetensors?download=true"),
}
# Files a node needs that are not among its widget values go into the workflow's own top-level `models` list
# (the frontend reads a node's `properties.models` only for names its widgets show). None today: workflow 5
# names its IP-Adapter files in loaders, because no frontend (1.49, 1.58) lists a top-level entry.
WORKFLOW_MODELS: dict[str, list[str]] = {}

# The paper's sampling defaults (LINFUSION_FACTS.md section 4).
STEPS, CFG, SEED = 50, 7.5, 42
SAMPLER = {"sampler_name": "euler", "scheduler": "normal"}
# The official timestep grid of the SDXL recipes: Euler, "leading" spacing (t = 301, 281, ..., 1 at strength 0.32
# of 50 steps). euler + ddim_uniform is that grid in the ladder and in a KSampler at denoise = the strength.
PAPER_GRID = {"sampler_name": PAPER_RECIPES["sdxl"].sampler, "scheduler": PAPER_RECIPES["sdxl"].scheduler}
# The SD 1.5 notebook's: diffusers' DEIS of Lykon/dreamshaper-8 on its own leading grid (t = 381, ... at 0.4).
SD15_PAPER_GRID = {"sampler_name": PAPER_RECIPES["sd15"].sampler, "scheduler": PAPER_RECIPES["sd15"].scheduler}
# The ladder's recipe choices, as the paper's SDXL high-res pipeline / super-resolution pipeline.
PAPER_HIGHRES = {"anchoring": "every stage to the base (paper high-res)", "size_conditioning": "final size (paper)",
                 "skip_residual": "sampler state (paper)", "blur_padding": "zeros (paper)"}
PAPER_SUPERRES = {"anchoring": "every stage to its input (paper super-res)", "size_conditioning": "stage size",
                  "skip_residual": "sampler state (paper)", "blur_padding": "zeros (paper)"}
PROMPT = ("a breathtaking alpine valley at sunrise, snow-capped peaks, a crystal clear lake, pine forest, "
          "a small wooden cabin, ultra detailed, sharp focus, professional landscape photograph")
NEGATIVE = "blurry, lowres, jpeg artifacts, watermark, text, deformed, duplicated, tiling"
# The paper gives no negative prompt: the SD 1.5 pipeline encodes "", the SDXL pipelines use all-zero embeddings.
PAPER_NEGATIVE_NOTE = {
    "sd15": "**Negative prompt: empty**, as the paper's notebook (no negative prompt: the empty string is encoded). "
            "Type one into it to steer away from something; that departs from the paper, and at CFG 7.5 it changes "
            "the image a lot.",
    "sdxl": "**Negative: zeros**, as the paper's SDXL pipelines (no negative prompt: all-zero embeddings and pooled "
            "vector, diffusers' force_zeros_for_empty_prompt) through ComfyUI's ConditioningZeroOut. To add a "
            "negative prompt, connect a CLIPTextEncodeSDXL with your text (same sizes) to `negative` instead; that "
            "departs from the paper, and at CFG 7.5 it changes the image a lot.",
}
REGISTRY_IDS = {"ours": "comfyui-linfusion", "core": "comfy-core", "ipadapter": "comfyui_ipadapter_plus"}
LINFUSION_FOLDER_NOTE = (
    "**LinFusion weights** download by themselves on the first run into `models/linfusion/` (progress on Load "
    "LinFusion). Offline: see the README's weights table.")


def node_properties(version: str):
    def props(kind, info):
        module = info.get("python_module", "")
        if "ComfyUI-LinFusion" in module:
            return {"cnr_id": REGISTRY_IDS["ours"], "ver": version}
        if module == "nodes" or module.startswith("comfy_extras") or module.startswith("comfy_api_nodes"):
            return {"cnr_id": REGISTRY_IDS["core"], "ver": "0.3.75"}
        if module == "custom_nodes.ComfyUI_IPAdapter_plus":      # the pack's registry id (its pyproject name)
            return {"cnr_id": REGISTRY_IDS["ipadapter"]}
        return {"cnr_id": info.get("cnr_id", "")}
    return props


def model_entry(name):
    directory, url = MODELS[name]
    return [{"name": name, "url": url, "directory": directory}]


def workflow_models(file_name: str) -> list[dict]:
    return [entry for name in WORKFLOW_MODELS.get(file_name, []) for entry in model_entry(name)]


def checkpoint_and_linfusion(g: UIGraph, ckpt: str, linfusion: str, lora: bool = False):
    """The checkpoint, (optionally a LoRA,) and LinFusion applied: returns (model, clip, vae)."""
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt, models=model_entry(ckpt))
    model, clip = loader["MODEL"], loader["CLIP"]
    if lora:
        lora_node = g.node("LoraLoader", model=model, clip=clip, lora_name=LORA_SD15, models=model_entry(LORA_SD15),
                           strength_model=0.8, strength_clip=0.8)
        model, clip = lora_node["MODEL"], lora_node["CLIP"]
    lin = g.node("LinFusionLoader", linfusion_name=linfusion)
    applied = g.node("ApplyLinFusion", model=model, linfusion=lin[0])
    return applied[0], clip, loader["VAE"]


def prompts(g: UIGraph, clip, text=PROMPT, negative=NEGATIVE, zero_negative=False):
    """Positive and negative prompt; zero_negative: the SDXL pipelines' all-zero negative (ConditioningZeroOut)."""
    pos = g.node("CLIPTextEncode", title="Positive prompt", color="positive", text=text, clip=clip)
    if zero_negative:
        return pos[0], zero_out(g, pos[0])
    title = "Negative prompt (empty: the paper's)" if negative == "" else "Negative prompt"
    neg = g.node("CLIPTextEncode", title=title, color="negative", text=negative, clip=clip)
    return pos[0], neg[0]


def zero_out(g: UIGraph, conditioning):
    return g.node("ConditioningZeroOut", title="Negative: zeros (the paper's)", color="negative",
                  conditioning=conditioning)[0]


def sdxl_prompts(g: UIGraph, clip, width: int, height: int, text=PROMPT, negative=NEGATIVE, zero_negative=False):
    """SDXL prompts with the size conditioning set: original and target size = width x height, crop 0.
    zero_negative: the SDXL pipelines' negative, the positive zeroed (its size conditioning kept, as theirs)."""
    size = dict(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    pos = g.node("CLIPTextEncodeSDXL", title="Positive prompt", color="positive", clip=clip, text_g=text, text_l=text,
                 **size)
    if zero_negative:
        return pos[0], zero_out(g, pos[0])
    neg = g.node("CLIPTextEncodeSDXL", title="Negative prompt", color="negative", clip=clip, text_g=negative,
                 text_l=negative, **size)
    return pos[0], neg[0]


def sampler(g: UIGraph, model, pos, neg, latent, **kw):
    values = {"seed": SEED, "steps": STEPS, "cfg": CFG, **SAMPLER, "denoise": 1.0, **kw}
    return g.node("KSampler", model=model, positive=pos, negative=neg, latent_image=latent, **values)[0]


def deis_txt2img(g: UIGraph, model, pos, neg, latent):
    """The SD 1.5 notebook's txt2img: diffusers' DEIS on its leading grid, through SamplerCustomAdvanced."""
    noise = g.node("RandomNoise", noise_seed=SEED)[0]
    guider = g.node("CFGGuider", model=model, positive=pos, negative=neg, cfg=CFG)[0]
    deis = g.node("LinFusionDEISSampler", steps=STEPS)[0]
    sigmas = g.node("LinFusionLeadingSigmas", model=model, steps=STEPS, denoise=1.0)[0]
    return g.node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=deis, sigmas=sigmas,
                  latent_image=latent)[0]


def wf_sd15_txt2img_2048(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## SD 1.5 + LinFusion, 2048 x 2048\n\nLinFusion replaces every self-attention of the UNet by "
               "a linear attention, so memory and time grow linearly with the pixels and SD 1.5 draws "
               "2048 x 2048 in one pass.\n\n" + LINFUSION_FOLDER_NOTE, title="About this workflow",
               width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SD15_CKPT, LINFUSION_SD15)
    with g.group("2. Prompt", 1):
        pos, neg = prompts(g, clip)
    with g.group("3. Generate 2048 x 2048", 2):
        latent = g.node("EmptyLatentImage", width=2048, height=2048, batch_size=1)[0]
        samples = sampler(g, model, pos, neg, latent)
        image = g.node("VAEDecode", samples=samples, vae=vae)[0]
        g.node("SaveImage", images=image, filename_prefix="LinFusion/sd15_2048")


def wf_sd15_16k_ladder(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## SD 1.5 + LinFusion: 16K (16384 x 8192)\n\nThe paper's SDEdit ladder: txt2img at 1024 x 512, "
               "then four x2 stages (2048 x 1024, 4096 x 2048, 8192 x 4096, 16384 x 8192) with strengths "
               "0.4 / 0.3 / 0.2 / 0.1 and int(50 x strength) = 20 / 15 / 10 / 5 steps each, CFG 7.5. Sampler of "
               "the base and every stage: the notebook's, diffusers' DEIS (the scheduler of its checkpoint, "
               "Lykon/dreamshaper-8) on its leading grid: LinFusion DEIS Sampler + Leading Sigmas for the base, "
               "the ladder's `" + SD15_PAPER_GRID["sampler_name"] + "`. The VAE works in tiles from the "
               "start (exact, seamless). The ladder's UNet runs in tiles (LinFusion Tiled UNet, exact). Lower "
               "`stages` for 4K or 8K.\n\n" + PAPER_NEGATIVE_NOTE["sd15"] + "\n\n" + LINFUSION_FOLDER_NOTE,
               title="About this workflow", width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SD15_CKPT, LINFUSION_SD15)
        model = g.node("LinFusionLowMemory", model=model)[0]
    with g.group("2. Prompt", 1):
        pos, neg = prompts(g, clip, negative="")
    with g.group("3. Base image 1024 x 512", 2):
        latent = g.node("EmptyLatentImage", width=1024, height=512, batch_size=1)[0]
        base = deis_txt2img(g, model, pos, neg, latent)
    with g.group("4. Ladder to 16384 x 8192", 3):
        g.note("**Tiled UNet** (exact: same result as untiled). At 8K and 16K the UNet's own activations no longer "
               "fit; this runs every step in 512 x 512 px tiles (`tile_size` 64 latent px) with the full-size "
               "activations parked in CPU memory (`park_device` cpu), bounding GPU memory by the tile. Keep it "
               "for the largest sizes; bypass it (Ctrl+B) at 4K or when memory is plentiful, since tiling "
               "costs time.", title="When to use the tiled UNet", width=NODE_WIDTH)
        ladder_model = g.node("LinFusionTiledUNet", model=model, tile_size=64, park_device="cpu", mode="exact")[0]
        big = g.node("LinFusionProgressiveUpscale", model=ladder_model, positive=pos, negative=neg, vae=vae,
                     latent=base, seed=SEED, stages=4, ladder="sd15", base_steps=STEPS, cfg=CFG, **SD15_PAPER_GRID,
                     upscale_in="pixels", vae_tile_size=1024)[0]
        image = g.node("LinFusionVAEDecodeTiled", samples=big, vae=vae, tile_size=1024)[0]
        g.node("SaveImage", images=image, filename_prefix="LinFusion/sd15_16k")


def wf_sdxl_demofusion(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## SDXL + LinFusion-XL: 8K, DemoFusion-style\n\nThe paper's SDXL high-res recipe. Base image at "
               "1024 x 1024, then x2 stages (2048, 4096, 8192) refined DemoFusion-style: a skip residual to the "
               "upscaled image and a dilated global branch, blended by a cosine schedule; strengths "
               "linspace(0.32, 0); every stage re-normalised to the base's mean/std. Sampler euler + "
               "ddim_uniform = the official timestep grid. SDXL is conditioned on the FINAL size everywhere: "
               "the prompts here say 8192 x 8192 (change them with `stages`), the ladder sets it per stage. "
               "Linear attention sees the whole canvas, so no patches are needed. Set `stages` to 4 for 16K "
               "(16384 x 16384).\n\n" + PAPER_NEGATIVE_NOTE["sdxl"] + "\n\n" + LINFUSION_FOLDER_NOTE,
               title="About this workflow", width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SDXL_CKPT, LINFUSION_SDXL)
        model = g.node("LinFusionLowMemory", model=model)[0]
    with g.group("2. Prompt (final size)", 1):
        pos, neg = sdxl_prompts(g, clip, 8192, 8192, zero_negative=True)
    with g.group("3. Base image 1024 x 1024", 2):
        latent = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)[0]
        base = sampler(g, model, pos, neg, latent, **PAPER_GRID)
    with g.group("4. DemoFusion stages to 8192 x 8192", 3):
        big = g.node("LinFusionProgressiveUpscale", model=model, positive=pos, negative=neg, vae=vae, latent=base,
                     seed=SEED, stages=3, ladder="sdxl", base_steps=STEPS, cfg=CFG, **PAPER_GRID,
                     upscale_in="pixels", demofusion=True, vae_tile_size=1024, **PAPER_HIGHRES)[0]
        image = g.node("LinFusionVAEDecodeTiled", samples=big, vae=vae, tile_size=1024)[0]
        g.node("SaveImage", images=image, filename_prefix="LinFusion/sdxl_8k")


def wf_controlnet(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## ControlNet + LinFusion, 2048 x 2048\n\nComfyUI's own ControlNet nodes steer a 2048 x 2048 "
               "LinFusion generation with the edges of your image. Load any image; the Canny node turns it into "
               "the edge map the canny ControlNet expects. **LinFusion ControlNet** gives the ControlNet's own "
               "self-attention LinFusion too, so the ControlNet does not bring back the quadratic cost LinFusion "
               "removed from the UNet.\n\n" + LINFUSION_FOLDER_NOTE,
               title="About this workflow", width=NODE_WIDTH)
        loader = g.node("CheckpointLoaderSimple", ckpt_name=SD15_CKPT, models=model_entry(SD15_CKPT))
        lin = g.node("LinFusionLoader", linfusion_name=LINFUSION_SD15)
        model = g.node("ApplyLinFusion", model=loader["MODEL"], linfusion=lin[0])[0]
        clip, vae = loader["CLIP"], loader["VAE"]
        control = g.node("ControlNetLoader", control_net_name=CONTROLNET_CANNY, models=model_entry(CONTROLNET_CANNY))
    with g.group("2. Control image", 1):
        image = g.node("LoadImage", image=INPUT_IMAGE)[0]
        edges = g.node("Canny", image=image, low_threshold=0.4, high_threshold=0.8)[0]
        g.node("PreviewImage", images=edges)
    with g.group("3. Prompt", 2):
        pos, neg = prompts(g, clip)
    with g.group("4. LinFusion in the ControlNet", 2):
        g.note("**Which modules** (`source`):\n\n- **base modules** (default): LinFusion-1-5's modules of the UNet "
               "blocks the ControlNet copies. Immediate; the ControlNet's attention then differs a little from its "
               "softmax original.\n- **distilled for this ControlNet**: first fits every module to this "
               "ControlNet's own attention at 512 px (this image and prompt, `distill_steps` per layer: minutes "
               "on a GPU, once), saved in `models/linfusion/controlnet_distilled/` and reused next time.\n\n"
               "Bypass the node (Ctrl+B) to run the ControlNet with softmax attention (slower at 2048 px).",
               title="LinFusion ControlNet: base or distilled", width=NODE_WIDTH)
        lf_control = g.node("LinFusionControlNet", control_net=control[0], linfusion=lin[0], image=edges,
                            conditioning=pos, source="base modules")
        cond = g.node("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=lf_control[0], image=edges,
                      strength=0.8, start_percent=0.0, end_percent=1.0, vae=vae)
    with g.group("5. Generate 2048 x 2048", 3):
        latent = g.node("EmptyLatentImage", width=2048, height=2048, batch_size=1)[0]
        samples = sampler(g, model, cond[0], cond[1], latent)
        out = g.node("VAEDecode", samples=samples, vae=vae)[0]
        g.node("SaveImage", images=out, filename_prefix="LinFusion/controlnet_2048")


def wf_ipadapter(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## IP-Adapter + LinFusion, 1536 x 1536\n\nNeeds the custom nodes **ComfyUI_IPAdapter_plus** (by "
               "cubiq; ComfyUI-Manager installs it) and two files, from `h94/IP-Adapter` on Hugging Face:\n\n"
               f"- `models/ipadapter/{IPADAPTER_PLUS}`: {MODELS[IPADAPTER_PLUS][1].split('?')[0]}\n"
               f"- `models/clip_vision/{CLIP_VISION_H}`: {MODELS[CLIP_VISION_H][1].split('?')[0]} "
               "(save it under this name)\n\n"
               "Both loaders name their file, so the missing-models list offers them once the pack is installed. "
               "IP-Adapter patches the cross-attention, LinFusion the self-attention: they stack in either "
               "order.\n\n" + LINFUSION_FOLDER_NOTE, title="About this workflow", width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SD15_CKPT, LINFUSION_SD15)
        ipadapter = g.node("IPAdapterModelLoader", ipadapter_file=IPADAPTER_PLUS, models=model_entry(IPADAPTER_PLUS))
        vision = g.node("CLIPVisionLoader", clip_name=CLIP_VISION_H, models=model_entry(CLIP_VISION_H))
    with g.group("2. Reference image", 1):
        ref = g.node("LoadImage", image=INPUT_IMAGE)[0]
        # The PLUS preset of IPAdapterUnifiedLoader + IPAdapter, with the two files named by their loaders.
        model = g.node("IPAdapterAdvanced", model=model, ipadapter=ipadapter[0], image=ref, clip_vision=vision[0],
                       weight=0.8, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
                       embeds_scaling="V only")[0]
    with g.group("3. Prompt", 2):
        pos, neg = prompts(g, clip, text="a cozy reading nook in the style of the reference, soft light, "
                                          "highly detailed")
    with g.group("4. Generate 1536 x 1536", 3):
        latent = g.node("EmptyLatentImage", width=1536, height=1536, batch_size=1)[0]
        samples = sampler(g, model, pos, neg, latent)
        out = g.node("VAEDecode", samples=samples, vae=vae)[0]
        g.node("SaveImage", images=out, filename_prefix="LinFusion/ipadapter")


def wf_lora(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## LoRA + LinFusion, 2048 x 2048\n\nThe LoRA here is PixelArt.Redmond for SD 1.5 "
               "(`artificialguybr/pixelartredmond-1-5v-pixel-art-loras-for-sd-1-5` on Hugging Face, into "
               "`models/loras/`; the missing-models dialog offers it), so the prompt starts with its trigger "
               "words. Any SD 1.5 LoRA works: pick yours in Load LoRA and change the prompt. Load the LoRA first, "
               "then apply LinFusion: the LoRA's changes to the text "
               "encoder and to every UNet layer apply, except the self-attention, which LinFusion replaces by "
               "its own distilled weights.\n\n" + LINFUSION_FOLDER_NOTE, title="About this workflow",
               width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SD15_CKPT, LINFUSION_SD15, lora=True)
    with g.group("2. Prompt", 1):
        pos, neg = prompts(g, clip, text="pixel art, PixArFK, " + PROMPT)
    with g.group("3. Generate 2048 x 2048", 2):
        latent = g.node("EmptyLatentImage", width=2048, height=2048, batch_size=1)[0]
        samples = sampler(g, model, pos, neg, latent)
        out = g.node("VAEDecode", samples=samples, vae=vae)[0]
        g.node("SaveImage", images=out, filename_prefix="LinFusion/lora_2048")


def wf_super_resolution(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## Super-resolution of your image (SDXL + LinFusion-XL)\n\nLoad an image (about 1024 px on "
               "its long side works best) and describe it in the prompt. Two x2 stages refine it "
               "DemoFusion-style to 4x its size, with the settings of the paper's super-resolution pipeline: "
               "each stage's colours anchored to its own upscaled input, SDXL conditioned on each stage's size, "
               "euler + ddim_uniform (the official timestep grid).\n\n" + PAPER_NEGATIVE_NOTE["sdxl"] + "\n\n"
               + LINFUSION_FOLDER_NOTE, title="About this workflow", width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SDXL_CKPT, LINFUSION_SDXL)
    with g.group("2. Your image", 1):
        image = g.node("LoadImage", image=INPUT_IMAGE)[0]
    with g.group("3. Prompt (describe the image)", 2):
        pos, neg = prompts(g, clip, text="a detailed, sharp, high resolution photograph", zero_negative=True)
    with g.group("4. Upscale x4", 3):
        big = g.node("LinFusionProgressiveUpscale", model=model, positive=pos, negative=neg, vae=vae, image=image,
                     seed=SEED, stages=2, ladder="sdxl", base_steps=STEPS, cfg=CFG, **PAPER_GRID,
                     upscale_in="pixels", demofusion=True, vae_tile_size=1024, **PAPER_SUPERRES)[0]
        out = g.node("LinFusionVAEDecodeTiled", samples=big, vae=vae, tile_size=1024)[0]
        g.node("SaveImage", images=out, filename_prefix="LinFusion/super_resolution")


def wf_demofusion_ksampler(g: UIGraph):
    with g.group("1. Models", 0):
        g.note("## Super-resolution x2 with your own sampler (SDXL + LinFusion-XL)\n\nThe recipe of workflow 7 "
               "as separate nodes you can rewire: bicubic x2 of your image, VAE encode, **DemoFusion Refine** "
               "(skip residual to the noised upscaled latent, dilated global branch, cosine blend; dilation "
               "`0` = auto, 2 for a 1024 px input) patching the model of a plain KSampler, then **Match Latent "
               "Mean/Std** against the upscaled latent so colours do not drift (the paper's super-resolution "
               "anchoring).\n\nKSampler: euler + ddim_uniform, denoise 0.32 and 16 steps = the official grid "
               "(t = 301, 281, ..., 1 of the paper's 50-step schedule); the same seed as DemoFusion Refine, so "
               "the skip residual's noised reference uses the sampler's own noise, as the paper. The prompts "
               "carry SDXL's size conditioning: set their width/height/target to your upscaled image's size "
               "(2048 for a 1024 px input). Here the skip residual acts on the model input (a MODEL patch cannot "
               "reach the sampler's state): at strength 0.32 that differs from the paper by a negligible amount; "
               "the Progressive Upscale node (workflow 7) has the exact form. Keep DemoFusion's `reference` on "
               "the latent the KSampler starts from; chain more x2 stages by copying group 4 (strengths 0.24, "
               "0.16, ...).\n\n" + PAPER_NEGATIVE_NOTE["sdxl"] + "\n\n" + LINFUSION_FOLDER_NOTE,
               title="About this workflow", width=NODE_WIDTH)
        model, clip, vae = checkpoint_and_linfusion(g, SDXL_CKPT, LINFUSION_SDXL)
    with g.group("2. Your image, x2 bicubic", 1):
        image = g.node("LoadImage", image=INPUT_IMAGE)[0]
        bigger = g.node("ImageScaleBy", image=image, upscale_method="bicubic", scale_by=2.0)[0]
        latent = g.node("VAEEncode", pixels=bigger, vae=vae)[0]
    with g.group("3. Prompt (upscaled size)", 2):
        pos, neg = sdxl_prompts(g, clip, 2048, 2048, text="a detailed, sharp, high resolution photograph",
                                zero_negative=True)
    with g.group("4. DemoFusion refine", 3):
        refine = g.node("LinFusionDemoFusion", model=model, reference=latent, dilation_ratio=0, seed=SEED,
                        skip_residual=True, blur_sigma=0.8, cosine_scale_1=3.0, cosine_scale_2=1.0,
                        cosine_scale_3=1.0, blur_padding="zeros (paper)")[0]
        samples = sampler(g, refine, pos, neg, latent, steps=16, denoise=0.32, **PAPER_GRID)
        anchored = g.node("LinFusionMatchLatentStats", latent=samples, reference=latent)[0]
        out = g.node("LinFusionVAEDecodeTiled", samples=anchored, vae=vae, tile_size=1024)[0]
        g.node("SaveImage", images=out, filename_prefix="LinFusion/demofusion_x2")


# File name -> recipe. The numbers order them in the template browser.
RECIPES = {
    "linfusion_1_sd15_txt2img_2048.json": wf_sd15_txt2img_2048,
    "linfusion_2_sd15_16k_ladder.json": wf_sd15_16k_ladder,
    "linfusion_3_sdxl_demofusion_8k.json": wf_sdxl_demofusion,
    "linfusion_4_controlnet_2048.json": wf_controlnet,
    "linfusion_5_ipadapter.json": wf_ipadapter,
    "linfusion_6_lora_2048.json": wf_lora,
    "linfusion_7_super_resolution.json": wf_super_resolution,
    "linfusion_8_demofusion_ksampler.json": wf_demofusion_ksampler,
}


def build(object_info, version: str) -> dict[str, dict]:
    """File name -> UI workflow, for every recipe whose node types `object_info` has."""
    out = {}
    for name, recipe in RECIPES.items():
        g = UIGraph(object_info, node_properties(version))
        try:
            recipe(g)
        except KeyError as e:
            out[name] = e
            continue
        out[name] = g.to_json()
        if name in WORKFLOW_MODELS:
            out[name]["models"] = workflow_models(name)
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv) -> int:
    from pathlib import Path as _P

    from comfy_harness import get_host
    from third_party_packs import IPADAPTER, PackNotLoaded, load_pack
    from workflow_convert import live_object_info

    import os
    get_host(_P(os.environ.get("LINFUSION_HOST_DIR", REPO / ".host")) / "fixtures")
    try:
        load_pack(IPADAPTER)    # workflow 5's nodes, from the pack snapshot in ../shared/third_party/
    except PackNotLoaded as e:
        print(f"[example_workflows] {e}", file=sys.stderr)
    info = live_object_info()
    version = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    built = build(info, version)
    stale = []
    for name, wf in built.items():
        if isinstance(wf, Exception):
            print(f"[example_workflows] {name}: not built, {wf}", file=sys.stderr)
            continue
        path = OUT_DIR / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != dumps(wf):
                stale.append(name)
        else:
            OUT_DIR.mkdir(exist_ok=True)
            path.write_text(dumps(wf))
            print(f"[example_workflows] wrote {path.relative_to(REPO)}")
    if stale:
        print(f"[example_workflows] stale: {stale}; run scripts/example_workflows.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

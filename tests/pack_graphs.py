"""Small API prompts for the third-party pack tests: the reduced SD 1.5 fixture with or without LinFusion, and
a spy that records what LinFusion's attention saw (its token counts)."""
from __future__ import annotations

import torch


def sd15_prompt(fixtures, *, width=64, height=64, steps=2, seed=1, linfusion=True, batch=1) -> dict:
    """checkpoint -> [Apply LinFusion] -> KSampler on an empty latent; "out" captures the latent. The model
    input of "ks" is `prompt["ks"]["inputs"]["model"]`: tests put pack nodes in between."""
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "out": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["ks", 0]}},
    }
    if linfusion:
        add_linfusion(p, fixtures.linfusion_folder["sd15"])
        p["ks"]["inputs"]["model"] = ["apply", 0]
    return p


def add_linfusion(p: dict, linfusion_name: str, model=("ckpt", 0)) -> None:
    p["lf"] = {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": linfusion_name}}
    p["apply"] = {"class_type": "ApplyLinFusion", "inputs": {"model": list(model), "linfusion": ["lf", 0],
                                                             "blocks": "all", "min_tokens": 0}}


class LinFusionTokens:
    """Token count (and batch) of every LinFusion attention call while active."""

    def __init__(self, core):
        self.cls = core.attention.module.LinFusionAttention
        self.shapes: list[tuple[int, ...]] = []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.cls):
                self.shapes.append(tuple(args[0].shape))
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False

    @property
    def tokens(self) -> set[int]:
        return {s[1] for s in self.shapes}


def blocky_input_image(name: str, seed: int) -> str:
    """A 64 x 64 picture of 8 x 8 random colour blocks in ComfyUI's input folder (LoadImage's list); its name."""
    import folder_paths
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(8, 8, 3, generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1) * 255)
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(f"{folder_paths.get_input_directory()}/{name}")
    return name

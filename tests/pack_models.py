"""Random-weight model files in the formats the third-party packs load (tests/third_party_packs.py).

Nothing is downloaded. Each file is built from the classes that read it (ComfyUI's, or the pack's own, taken
from the pack as ComfyUI's loader imported it: nothing of the packs is copied here), filled with
fixture_models.fill_random_, and saved under the fixture root in the model folder the pack looks in, with
the file name a user's file has (the packs find some files by name patterns). Cached like fixture_models:
a stamp per file, keyed by the source of its generator and the ComfyUI version.

- clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors: ComfyUI's ViT-H/14 (the config is fixed by
  ComfyUI's detection, so the full 632 M parameters; the largest file here, ~1.3 GB in fp16).
- ipadapter/ip-adapter-plus_sd15.safetensors: the PLUS layout (`image_proj.*`: the pack's Resampler with 16
  queries over ViT-H's 1280-wide hidden states; `ip_adapter.<n>.to_{k,v}_ip.weight` for the 16 cross-attention
  sites the pack numbers n = 1, 3, ..., 31), sized for the reduced SD 1.5 fixture where it has those blocks.
- diffusion_models/linfusion_test_sd15_full_unet.safetensors + linfusion/linfusion_test_sd15_full: the full SD
  1.5 UNet layout (AnimateDiff's motion modules are placed by SD 1.5's block layout: 4 levels, 2 res blocks)
  and LinFusion weights for its 16 self-attentions.
- animatediff_models/linfusion_test_mm_sd15_v3.safetensors: an AnimateDiff v3-layout SD 1.5 motion module
  (down and up blocks, no mid block, 32-frame positional encoding), built from the pack's MotionModule.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import fixture_models as fm

CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IPADAPTER_PLUS_SD15 = "ip-adapter-plus_sd15.safetensors"
FULL_SD15_UNET = "linfusion_test_sd15_full_unet.safetensors"
FULL_SD15_LINFUSION = "linfusion_test_sd15_full"
MOTION_MODULE = "linfusion_test_mm_sd15_v3.safetensors"

# SD 1.5 as released (comfy.model_detection's unet_config of v1-5-pruned-emaonly).
FULL_SD15_UNET_CONFIG = {**fm._UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
                         "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                         "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                         "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768}
FULL_SD15_DIFFUSERS = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                       "cross_attention_dim": 768, "attention_head_dim": 8}

# Inner width of the cross-attention the pack patches at each of its SD 1.5 sites, in its order
# (input 1,2,4,5,7,8; output 3..11; middle): SD 1.5's own widths, except the sites the reduced fixture UNet
# has (input 1 and output 3 at 320 channels, the middle at 640), which are what runs in the tests.
_SD15_SITE_DIMS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
_REDUCED_SITE_DIMS = {0: 320, 6: 320, 15: 640}


def _key(generate, *extra) -> str:
    """A file is valid for the source of the method that writes it (and the constants it reads), the shared
    helpers of fixture_models and this ComfyUI version: editing one generator regenerates its files only."""
    import comfyui_version
    text = "\0".join([inspect.getsource(generate), inspect.getsource(fm.fill_random_),
                      inspect.getsource(fm.linfusion_state_dict), repr(extra), comfyui_version.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PackModels:
    """Paths/names of the pack model files under `root`, generated on first use (one lock with FixtureModels)."""

    def __init__(self, root: Path, fixtures: fm.FixtureModels):
        self.root = Path(root)
        self.fixtures = fixtures

    def _ensure(self, unit: str, outputs: list[Path], generate, owner, *constants) -> None:
        stamp = self.root / ".stamps" / f"pack_{unit}.json"
        key = _key(owner, *constants)

        def fresh():
            try:
                return json.loads(stamp.read_text())["key"] == key and all(p.exists() for p in outputs)
            except (OSError, ValueError, KeyError):
                return False
        if fresh():
            return
        with self.fixtures._lock():
            if fresh():
                return
            for p in outputs:
                p.parent.mkdir(parents=True, exist_ok=True)
            generate()
            stamp.parent.mkdir(exist_ok=True)
            stamp.write_text(json.dumps({"key": key}))

    def folder(self, kind: str) -> Path:
        return self.root / kind

    # -- IP-Adapter -------------------------------------------------------------------------------------
    def clip_vision_h(self) -> str:
        path = self.folder("clip_vision") / CLIP_VISION_H

        def generate():
            import comfy.clip_vision
            config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
            clip = comfy.clip_vision.ClipVisionModel(str(config))
            fm.fill_random_(clip.model, fm._generator("clip_vision", "vit_h"))
            fm._save({k: v.to(torch.float16).contiguous() for k, v in clip.model.state_dict().items()}, path)
        self._ensure("clip_vision_h", [path], generate, PackModels.clip_vision_h)
        return CLIP_VISION_H

    def ipadapter_plus_sd15(self, pack_module) -> str:
        path = self.folder("ipadapter") / IPADAPTER_PLUS_SD15

        def generate():
            resampler_cls = sys.modules[pack_module.__name__ + ".image_proj_models"].Resampler
            # As the pack builds it for a PLUS SD 1.5 file (IPAdapter.init_proj_plus).
            proj = resampler_cls(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                                 output_dim=768, ff_mult=4)
            g = fm._generator("ipadapter", "plus_sd15")
            fm.fill_random_(proj, g)
            sd = {f"image_proj.{k}": v for k, v in proj.state_dict().items()}
            for i, dim in enumerate(_SD15_SITE_DIMS):
                dim = _REDUCED_SITE_DIMS.get(i, dim)
                for kv in ("k", "v"):
                    sd[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = torch.randn(dim, 768, generator=g) / 768 ** 0.5
            fm._save({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, path)
        self._ensure("ipadapter_plus_sd15", [path], generate, PackModels.ipadapter_plus_sd15, _SD15_SITE_DIMS,
                     _REDUCED_SITE_DIMS)
        return IPADAPTER_PLUS_SD15

    # -- AnimateDiff ------------------------------------------------------------------------------------
    def full_sd15(self) -> tuple[str, str]:
        """(UNet file in diffusion_models/, LinFusion folder in linfusion/) of the full SD 1.5 layout."""
        unet = self.folder("diffusion_models") / FULL_SD15_UNET
        lin = self.folder("linfusion") / FULL_SD15_LINFUSION

        def generate():
            import comfy.supported_models
            config = comfy.supported_models.SD15(dict(FULL_SD15_UNET_CONFIG))
            config.set_inference_dtype(torch.float16, None)
            model = config.get_model({})
            fm.fill_random_(model.diffusion_model, fm._generator("sd15_full", "unet"))
            fm._save({k: v.to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()},
                     unet)
            del model
            lconfig = _linfusion_config(FULL_SD15_DIFFUSERS)
            sd = fm.linfusion_state_dict("sd15_full", lconfig)
            tmp = lin.with_name(f".{lin.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "config.json").write_text(json.dumps(lconfig, indent=2))
            fm._save(sd, tmp / "diffusion_pytorch_model.safetensors")
            shutil.rmtree(lin, ignore_errors=True)
            os.replace(tmp, lin)
        self._ensure("full_sd15", [unet, lin], generate, PackModels.full_sd15, FULL_SD15_UNET_CONFIG,
                     FULL_SD15_DIFFUSERS)
        return FULL_SD15_UNET, FULL_SD15_LINFUSION

    def motion_module(self, pack_module) -> str:
        path = self.folder("animatediff_models") / MOTION_MODULE

        def generate():
            import comfy.ops
            mad = sys.modules[pack_module.__name__ + ".animatediff.motion_module_ad"]
            g = fm._generator("animatediff", "mm_sd15_v3")
            sd = {}
            channels = (320, 640, 1280, 1280)
            for kind, chans in (("down", channels), ("up", tuple(reversed(channels)))):
                for idx, c in enumerate(chans):
                    block = mad.MotionModule(c, temporal_pe=True, temporal_pe_max_len=32, block_type=kind,
                                             block_idx=idx, ops=comfy.ops.disable_weight_init)
                    fm.fill_random_(block, g)
                    sd.update({f"{kind}_blocks.{idx}.{k}": v for k, v in block.state_dict().items()})
            fm._save({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, path)
        self._ensure("motion_module_sd15_v3", [path], generate, PackModels.motion_module)
        return MOTION_MODULE


def _linfusion_config(diffusers_kwargs: dict) -> dict:
    """config.json of the hub layout for a diffusers UNet config: one entry per attn1, in named_modules order."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_kwargs)
    modules = [{"dim_n": m.to_q.in_features, "heads": m.heads, "module_name": name, "projection_mid_dim": None}
               for name, m in unet.named_modules() if name.endswith(".attn1")]
    return {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules}

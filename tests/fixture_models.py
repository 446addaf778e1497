"""Deterministic random-weight model files for the tests: checkpoints, LinFusion weights, a LoRA, a ControlNet.

Nothing here is downloaded. Every file is generated from a seeded torch.Generator with ComfyUI's own
classes, and checkpoints are written by ComfyUI's own comfy.sd.save_checkpoint, so that the detection of
both test hosts (ComfyUI 0.3.75 and 0.33) classifies them exactly as it classifies the real ones:

- ``sd15``: a reduced SD 1.5 UNet (two levels, one res block each, ~107 M params) -> ``SD15``.
- ``sd21``: an SD 2.x UNet with 12 output blocks and a transformer in output block 11, whose
  ``norm1.bias`` has std ~0.2: ComfyUI reads that as v-prediction -> ``SD20`` + ``V_PREDICTION``.
- ``sdxl``: the Segmind Vega layout (transformer depth [0, 0, 1, 1, 2, 2], ~745 M params) with CLIP-L and
  CLIP-G -> ``Segmind_Vega`` (an SDXL subclass). The big one: generated only when a test asks for it.

Text encoders and VAE are the real architectures (their configs are fixed in ComfyUI, not read from the
file), with random weights. Files are cached under ``$LINFUSION_FIXTURES_DIR`` (by default ``.host/fixtures/``;
see ``FixtureModels``), keyed by a hash of this file: editing a generator regenerates its files. One cache
serves both hosts, since each writes the same files (checked by tests/test_fixtures.py).

LinFusion weights come in the three layouts users have (LINFUSION_FACTS.md section 3), all with the same
tensors: a hub folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), a single
``.safetensors`` whose metadata key ``LINFUSION_CONFIG_METADATA_KEY`` ("linfusion_config") holds the same
config JSON, and a single ``.safetensors`` with no config at all.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger("LinFusion")

FAMILIES = ("sd15", "sd21", "sdxl")
LINFUSION_CONFIG_METADATA_KEY = "linfusion_config"
SEED = 20240902  # the LinFusion paper's arXiv month; any fixed number would do

# ComfyUI unet_config of each fixture, as comfy.model_detection.detect_unet_config reports it (the model
# class adds num_heads / num_head_channels / attn_precision on top, see unet_config()).
_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
BASE_UNET_CONFIGS = {
    "sd15": {**_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768},
    "sd21": {**_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [3, 3, 3], "channel_mult": [1, 1, 1],
             "transformer_depth": [1] * 9, "transformer_depth_output": [1] * 12,
             "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024},
    "sdxl": {**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
             "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 2, 2],
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": -1,
             "use_linear_in_transformer": True, "context_dim": 2048},
}
# The comfy.supported_models class ComfyUI's detection picks for each fixture.
MODEL_CLASSES = {"sd15": "SD15", "sd21": "SD20", "sdxl": "Segmind_Vega"}

# The same UNets in diffusers' vocabulary (UNet2DConditionModel kwargs). diffusers' attention_head_dim is
# the number of heads for these families (its historical naming).
DIFFUSERS_CONFIGS = {
    "sd15": {"sample_size": 64, "block_out_channels": [320, 640], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21": {"sample_size": 96, "block_out_channels": [320, 320, 320], "layers_per_block": 3,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
             "cross_attention_dim": 1024, "attention_head_dim": 5, "use_linear_projection": True,
             "upcast_attention": True},
    "sdxl": {"sample_size": 128, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 1, 2], "mid_block_type": "UNetMidBlock2D",
             "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}

# SD 1.x/2.x VAE (also SDXL's layout), exactly as comfy.sd.VAE builds it for these keys.
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# ComfyUI's SD20.model_type() calls a checkpoint v-prediction when this bias has std > 0.09.
SD2_VPRED_PROBE_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"

# LoRA: kohya names of the blocks it touches, and the layers it touches in each of them.
LORA_BLOCKS = ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_1_attentions_1")
LORA_LAYERS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0",
               "attn2_to_q", "attn2_to_k", "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
LORA_RANK = 4


def unet_config(family: str) -> dict:
    """The unet_config ComfyUI's model object carries for this fixture (detection + the class's extras)."""
    import comfy.supported_models
    return dict(getattr(comfy.supported_models, MODEL_CLASSES[family])(BASE_UNET_CONFIGS[family]).unet_config)


def _source_key() -> str:
    """Files are valid for this generator source. Not for one ComfyUI version only: they stand for the files
    users download, which any ComfyUI reads, and every host writes the same bytes (tests/test_fixtures.py
    checks that for the SD 1.5 checkpoint), so both test hosts share one cache."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Random weights

def fill_random_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter with variance-preserving random values, in a fixed order.

    ComfyUI's layers skip initialisation (their memory is garbage), and tiny weights would let a broken
    attention still "match": linear/conv weights get std 1/sqrt(fan_in), norms 1 + 0.1 N(0, 1),
    embeddings std 0.02, biases and other vectors std 0.02.
    """
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and name == "weight":
                    r = 1.0 + 0.1 * r
                elif isinstance(mod, torch.nn.Embedding) or "embedding" in name:
                    r = 0.02 * r
                elif p.ndim >= 2:
                    r = r / math.sqrt(p[0].numel())
                else:
                    r = 0.02 * r
                p.copy_(r)
    return module


def _generator(*parts: str) -> torch.Generator:
    """One independent stream per file, so generating one file never shifts another's weights."""
    digest = hashlib.sha256("/".join((str(SEED),) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _cpu_model_options() -> dict:
    cpu = torch.device("cpu")
    return {"dtype": torch.float16, "initial_device": cpu, "load_device": cpu, "offload_device": cpu}


def build_unet_model(family: str, dtype=torch.float16, fill: bool = True, device=None):
    """A ComfyUI BaseModel of the fixture's layout, random weights when fill (device="meta" for names only)."""
    import comfy.supported_models
    model_config = getattr(comfy.supported_models, MODEL_CLASSES[family])(BASE_UNET_CONFIGS[family])
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    if fill:
        fill_random_(model.diffusion_model, _generator(family, "unet"))
        if family == "sd21":
            bias = dict(model.diffusion_model.named_parameters())[SD2_VPRED_PROBE_KEY]
            with torch.no_grad():
                bias.copy_(0.2 * torch.randn(bias.shape, generator=_generator(family, "vpred")))
    return model


def write_checkpoint(family: str, path: Path) -> None:
    """UNet + text encoder(s) + VAE in one file, written by ComfyUI's own comfy.sd.save_checkpoint (what its
    Save Checkpoint node calls), so the keys are exactly a real checkpoint's."""
    import comfy.model_patcher
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(build_unet_model(family), load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=model.model.model_config.clip_target(), model_options=_cpu_model_options())
    fill_random_(clip.cond_stage_model, _generator(family, "clip"))
    vae_model = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4).to(torch.float16)
    fill_random_(vae_model, _generator(family, "vae"))
    vae = comfy.sd.VAE(sd=vae_model.state_dict(), dtype=torch.float16)
    comfy.sd.save_checkpoint(str(path), model, clip, vae)


# ---------------------------------------------------------------------------------------------------------
# LinFusion weights

def diffusers_unet_on_meta(family: str):
    """The diffusers UNet of this layout, without memory: the independent source of module names."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**DIFFUSERS_CONFIGS[family])


def linfusion_config(family: str) -> dict:
    """config.json of the hub layout: one entry per attn1, in diffusers named_modules() order."""
    modules = []
    for name, mod in diffusers_unet_on_meta(family).named_modules():
        if name.endswith(".attn1"):
            dim = mod.to_q.in_features
            modules.append({"dim_n": dim, "heads": mod.heads, "module_name": name,
                            "projection_mid_dim": dim // 16 if family == "sdxl" else None})
    return {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules}


def linfusion_keys(index: int, mid_dim: int | None) -> list[str]:
    """The 17 tensor names of module `index` (11 when mid_dim is -1: the MLP branches are identities)."""
    keys = [f"{index}.to_q.weight", f"{index}.to_k.weight", f"{index}.to_v.weight",
            f"{index}.to_out.0.weight", f"{index}.to_out.0.bias"]
    if mid_dim != -1:
        for branch in ("to_q_", "to_k_"):
            keys += [f"{index}.{branch}.{j}.{p}" for j in (0, 1, 3) for p in ("weight", "bias")]
    return keys


def linfusion_state_dict(family: str, config: dict) -> dict[str, torch.Tensor]:
    g = _generator(family, "linfusion")
    sd = {}
    for i, entry in enumerate(config["modules_list"]):
        c = entry["dim_n"]
        m = c if entry["projection_mid_dim"] is None else entry["projection_mid_dim"]
        shapes = {"to_q.weight": (c, c), "to_k.weight": (c, c), "to_v.weight": (c, c),
                  "to_out.0.weight": (c, c), "to_out.0.bias": (c,)}
        if m != -1:
            for branch in ("to_q_", "to_k_"):
                shapes.update({f"{branch}.0.weight": (m, c), f"{branch}.0.bias": (m,),
                               f"{branch}.1.weight": (m,), f"{branch}.1.bias": (m,),
                               f"{branch}.3.weight": (c, m), f"{branch}.3.bias": (c,)})
        for key in linfusion_keys(i, m):
            shape = shapes[key.split(".", 1)[1]]
            r = torch.randn(shape, generator=g)
            if key.endswith(".1.weight"):          # the LayerNorm of the MLP branch
                r = 1.0 + 0.1 * r
            elif len(shape) == 2:
                r = r / math.sqrt(shape[1])
            else:
                r = 0.02 * r
            sd[key] = r.to(torch.float16)
    return sd


# ---------------------------------------------------------------------------------------------------------
# SD 1.5 ControlNet and LoRA

def controlnet_state_dict() -> dict:
    """An SD 1.5 ControlNet for the reduced sd15 UNet, in the original ('control_model.') layout."""
    import comfy.cldm.cldm
    import comfy.ops
    config = unet_config("sd15")
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **config, dtype=torch.float16, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    fill_random_(net, _generator("sd15", "controlnet"))
    return {"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}


def lora_targets() -> dict[str, str]:
    """kohya LoRA name -> the ComfyUI weight key it patches, from ComfyUI's own LoRA key map."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(build_unet_model("sd15", fill=False), {})
    wanted = {f"lora_unet_{b}_transformer_blocks_0_{layer}" for b in LORA_BLOCKS for layer in LORA_LAYERS}
    targets = {k: v for k, v in key_map.items() if k in wanted}
    missing = wanted - targets.keys()
    if missing:
        raise RuntimeError(f"ComfyUI's LoRA key map has no entry for {sorted(missing)}")
    return dict(sorted(targets.items()))


def lora_state_dict() -> dict:
    """Rank-4 kohya LoRA; lora_up is random (not zero) so applying it visibly changes the weights."""
    model_sd = build_unet_model("sd15", fill=False).state_dict()
    g = _generator("sd15", "lora")
    sd = {}
    for name, target in lora_targets().items():
        out_dim, in_dim = model_sd[target].shape[:2]
        sd[f"{name}.lora_down.weight"] = (torch.randn(LORA_RANK, in_dim, generator=g) / math.sqrt(in_dim)).half()
        sd[f"{name}.lora_up.weight"] = (0.5 * torch.randn(out_dim, LORA_RANK, generator=g)
                                        / math.sqrt(LORA_RANK)).half()
        sd[f"{name}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
    return sd


# ---------------------------------------------------------------------------------------------------------
# The cache on disk

def _save(sd: dict, path: Path, metadata: dict | None = None) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    import comfy.utils
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    comfy.utils.save_torch_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# unit -> (ComfyUI model folder, names of the files one generator call writes for a family).
OUTPUTS = {
    "checkpoint": ("checkpoints", ("linfusion_test_{f}.safetensors",)),
    "linfusion": ("linfusion", ("linfusion_test_{f}", "linfusion_test_{f}_single.safetensors",
                                "linfusion_test_{f}_bare.safetensors")),
    "controlnet": ("controlnet", ("linfusion_test_controlnet_{f}.safetensors",)),
    "lora": ("loras", ("linfusion_test_lora_{f}.safetensors",)),
}


class FixtureModels:
    """Names of the fixture files in ComfyUI's model folders, generated on first use of each.

    checkpoint[f]        checkpoints/   linfusion_test_<f>.safetensors
    linfusion_folder[f]  linfusion/     linfusion_test_<f> (folder: config.json + diffusion_pytorch_model.safetensors)
    linfusion_single[f]  linfusion/     linfusion_test_<f>_single.safetensors (config in metadata
                                        key LINFUSION_CONFIG_METADATA_KEY)
    linfusion_bare[f]    linfusion/     linfusion_test_<f>_bare.safetensors (no config)
    controlnet_sd15      controlnet/    linfusion_test_controlnet_sd15.safetensors
    lora_sd15            loras/         linfusion_test_lora_sd15.safetensors
    unet_config[f], diffusers_config[f], linfusion_config[f]: plain dicts (no generation).
    lora_sd15_targets: kohya name -> ComfyUI weight key it patches.
    path(unit, name) gives the absolute path (unit: "checkpoint", "linfusion", "controlnet", "lora");
    generation_log lists what this process generated (seconds, bytes, process peak RSS so far).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        for folder, _ in OUTPUTS.values():
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.generation_log: list[dict] = []
        self.checkpoint = _LazyNames(self, "checkpoint", 0)
        self.linfusion_folder = _LazyNames(self, "linfusion", 0)
        self.linfusion_single = _LazyNames(self, "linfusion", 1)
        self.linfusion_bare = _LazyNames(self, "linfusion", 2)
        self.unet_config = {f: unet_config(f) for f in FAMILIES}
        self.diffusers_config = {f: dict(DIFFUSERS_CONFIGS[f]) for f in FAMILIES}
        self._linfusion_config: dict = {}

    @property
    def linfusion_config(self) -> Mapping:
        return _LazyValues(lambda f: self._linfusion_config.setdefault(f, linfusion_config(f)))

    @property
    def controlnet_sd15(self) -> str:
        return self.name("controlnet", "sd15")

    @property
    def lora_sd15(self) -> str:
        return self.name("lora", "sd15")

    @property
    def lora_sd15_targets(self) -> dict[str, str]:
        return lora_targets()

    def name(self, unit: str, family: str, index: int = 0) -> str:
        """File name (in its ComfyUI model folder) of output `index` of a unit, generated if needed."""
        self.ensure(unit, family)
        return OUTPUTS[unit][1][index].format(f=family)

    def path(self, unit: str, name: str) -> Path:
        """Absolute path of a fixture file, e.g. path("checkpoint", fixtures.checkpoint["sd15"])."""
        return self.root / OUTPUTS[unit][0] / name

    # -- generation ------------------------------------------------------------------------------------
    def _outputs(self, unit: str, family: str) -> list[Path]:
        folder, names = OUTPUTS[unit]
        return [self.root / folder / n.format(f=family) for n in names]

    def _stamp(self, unit: str, family: str) -> Path:
        return self.root / ".stamps" / f"{unit}_{family}.json"

    def _fresh(self, unit: str, family: str, key: str) -> bool:
        stamp = self._stamp(unit, family)
        try:
            ok = json.loads(stamp.read_text())["key"] == key
        except (OSError, ValueError, KeyError):
            return False
        return ok and all(p.exists() for p in self._outputs(unit, family))

    @contextlib.contextmanager
    def _lock(self):
        """One generator at a time across processes (two pytest runs share the host folder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ensure(self, unit: str, family: str) -> None:
        if family not in FAMILIES:
            raise KeyError(f"unknown fixture family {family!r}; expected one of {FAMILIES}")
        key = _source_key()
        if self._fresh(unit, family, key):
            return
        with self._lock():
            if self._fresh(unit, family, key):
                return
            start = time.perf_counter()
            getattr(self, f"_generate_{unit}")(family)
            seconds = time.perf_counter() - start
            size = sum(_size(p) for p in self._outputs(unit, family))
            record = {"key": key, "unit": unit, "family": family, "seconds": round(seconds, 1), "bytes": size,
                      "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
            stamp = self._stamp(unit, family)
            stamp.parent.mkdir(exist_ok=True)
            stamp.write_text(json.dumps(record))
            self.generation_log.append(record)
            log.info("[LinFusion] generated fixture %s/%s in %.1f s (%.0f MB)", unit, family, seconds, size / 2**20)

    def _generate_checkpoint(self, family: str) -> None:
        path = self._outputs("checkpoint", family)[0]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        write_checkpoint(family, tmp)
        os.replace(tmp, path)

    def _generate_linfusion(self, family: str) -> None:
        import comfy.utils
        folder, single, bare = self._outputs("linfusion", family)
        config = linfusion_config(family)
        sd = linfusion_state_dict(family, config)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        comfy.utils.save_torch_file(sd, str(tmp / "diffusion_pytorch_model.safetensors"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        _save(sd, single, metadata={LINFUSION_CONFIG_METADATA_KEY: json.dumps(config)})
        _save(sd, bare)

    def _generate_controlnet(self, family: str) -> None:
        _require_sd15("controlnet", family)
        _save(controlnet_state_dict(), self._outputs("controlnet", family)[0])

    def _generate_lora(self, family: str) -> None:
        _require_sd15("lora", family)
        _save(lora_state_dict(), self._outputs("lora", family)[0])


def _require_sd15(unit: str, family: str) -> None:
    if family != "sd15":
        raise KeyError(f"there is only an SD 1.5 {unit} fixture, not one for {family!r}")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


class _LazyNames(Mapping):
    """family -> file name; the file is generated (or found in the cache) on first lookup."""

    def __init__(self, owner: FixtureModels, unit: str, index: int):
        self._owner, self._unit, self._index = owner, unit, index

    def __getitem__(self, family: str) -> str:
        return self._owner.name(self._unit, family, self._index)

    def __iter__(self):
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


class _LazyValues(Mapping):
    def __init__(self, compute):
        self._compute = compute

    def __getitem__(self, family: str):
        if family not in FAMILIES:
            raise KeyError(f"unknown fixture family {family!r}; expected one of {FAMILIES}")
        return self._compute(family)

    def __iter__(self):
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)

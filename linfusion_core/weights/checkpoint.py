"""Reading LinFusion weights from disk, and checking them against the model they are applied to.

Three layouts load:
  - the hub folder: `config.json` + `diffusion_pytorch_model.safetensors`;
  - one `.safetensors` whose metadata key `linfusion_config` holds the config.json text;
  - one bare `.safetensors` (renamed hub file): dims and MLP widths come from the weights, heads from
    the target model, module names from the target's attn1 modules in diffusers named_modules() order.
Every failure is a `LinFusionLoadError` that names the file and says what was found and what was expected.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch

log = logging.getLogger("LinFusion")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
METADATA_KEY = "linfusion_config"
_KEY = re.compile(r"^(\d+)\.(.+)$")
_MLP_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


class LinFusionLoadError(ValueError):
    """A LinFusion file that cannot be used (unreadable, inconsistent, or for another model)."""


@dataclass
class ModuleSpec:
    index: int
    dim: int
    projection_mid_dim: int          # resolved: C when the config says null, -1 for no MLP
    heads: int | None = None         # None when only weights were found
    name: str | None = None          # diffusers module name, None when only weights were found


@dataclass
class LinFusionWeights:
    """What the LINFUSION socket carries: weights on CPU plus what is known about their modules."""
    source: str                       # file or folder, as shown to the user
    modules: list[ModuleSpec]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config_source: str = "weights only"   # "config.json", "metadata" or "weights only"

    @property
    def family(self) -> str:
        return weights_family(self.modules)

    @property
    def family_ambiguous(self) -> bool:
        """True when the file cannot say which of several families it is for (see AMBIGUOUS_FAMILY)."""
        return self.family == AMBIGUOUS_FAMILY and any(m.heads is None for m in self.modules)

    def module_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"{index}."
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}

    def describe(self) -> str:
        dims = "/".join(str(d) for d in sorted({m.dim for m in self.modules}))
        family = (f"family SD1.x or SD2.x (not knowable without a config: it will be ASSUMED from the model it is "
                  f"applied to)" if self.family_ambiguous else f"family {self.family}")
        return (f"{os.path.basename(self.source.rstrip('/'))}: {len(self.modules)} modules, dims {dims}, "
                f"{family}, config from {self.config_source}")


# SD 1.x and SD 2.x LinFusion files have the same tensors: 16 modules of 320/640/1280 channels with full-width
# MLPs. They differ only in the head count the modules were trained with (SD 1.x: 8 heads; SD 2.x: 64-channel
# heads), and no tensor shows it: every weight is C x C, C x m or a vector, and heads only split the channel
# axis inside the forward pass, so any head count is consistent with the same tensors. Without a config
# (config.json or our metadata key) the family is therefore taken from the model, and said to be assumed.
AMBIGUOUS_FAMILY = "SD1.x/SD2.x"


def weights_family(modules: list[ModuleSpec]) -> str:
    """The model family a set of LinFusion modules was made for, from their signature (see FACTS table)."""
    if not modules:
        return "unknown"
    if all(m.projection_mid_dim * 16 == m.dim for m in modules):
        return "SDXL"
    if all(m.projection_mid_dim == m.dim for m in modules):
        if all(m.heads is not None for m in modules):
            if all(m.heads == 8 for m in modules) and any(m.dim // m.heads != 64 for m in modules):
                return "SD1.x"
            if all(m.dim // m.heads == 64 for m in modules):
                return "SD2.x"
        return AMBIGUOUS_FAMILY
    return "unknown"


def families_compatible(found: str, expected: str) -> bool:
    if "unknown" in (found, expected):
        return True
    return expected in found.split("/")


# ---------------------------------------------------------------------------------------------- reading

def load_linfusion(path: str, display_name: str | None = None) -> LinFusionWeights:
    """Read a hub folder, or a single .safetensors (with or without config), into LinFusionWeights."""
    shown = display_name or path
    weights_path, config_path = _locate(path, shown)
    config_text, config_source = None, "weights only"
    if config_path is not None:
        config_text, config_source = _read_text(config_path, shown), CONFIG_FILE

    state_dict, metadata = _read_safetensors(weights_path, shown)
    if config_text is None and metadata and METADATA_KEY in metadata:
        config_text, config_source = metadata[METADATA_KEY], "metadata"

    modules = modules_from_weights(state_dict, shown)
    if config_text is not None:
        _apply_config(modules, _parse_config(config_text, shown, config_source), shown, config_source)
    return LinFusionWeights(shown, modules, state_dict, config_source)


def peek_linfusion(path: str, display_name: str | None = None) -> LinFusionWeights:
    """Like load_linfusion but reads only the safetensors header (shapes and metadata): cheap enough to scan
    a folder of 200-900 MB files for the one that fits a model. The result has no tensors."""
    from safetensors import safe_open

    shown = display_name or path
    weights_path, config_path = _locate(path, shown)
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: _Shape(tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:
        raise LinFusionLoadError(f"LinFusion file '{shown}' is not a readable safetensors file: {e}") from e
    modules = modules_from_weights(shapes, shown)
    config_text, source = None, "weights only"
    if config_path is not None:
        config_text, source = _read_text(config_path, shown), CONFIG_FILE
    elif METADATA_KEY in metadata:
        config_text, source = metadata[METADATA_KEY], "metadata"
    if config_text is not None:
        _apply_config(modules, _parse_config(config_text, shown, source), shown, source)
    return LinFusionWeights(shown, modules, {}, source)


def _locate(path: str, shown: str) -> tuple[str, str | None]:
    """(weights file, config.json or None) of a hub folder or a single file. A file named like the hub's
    weights (`diffusion_pytorch_model*.safetensors`, variants such as `.fp16` included) takes the config.json
    beside it; any other single file carries its config in its metadata, or has none."""
    if os.path.isdir(path):
        weights_path = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".sft", ".bin", ".ckpt")))
            raise LinFusionLoadError(
                f"LinFusion folder '{shown}' has no {WEIGHTS_FILE} (found: {', '.join(found) or 'no weight files'}); "
                f"expected the hub layout {CONFIG_FILE} + {WEIGHTS_FILE}: download both files of the LinFusion "
                f"repository into the folder")
        config_path = os.path.join(path, CONFIG_FILE)
        return weights_path, config_path if os.path.isfile(config_path) else None
    if not os.path.isfile(path):
        raise LinFusionLoadError(f"LinFusion file '{shown}' does not exist")
    sibling = os.path.join(os.path.dirname(path), CONFIG_FILE)
    hub_named = os.path.basename(path).startswith(WEIGHTS_FILE.split(".")[0] + ".")
    return path, sibling if hub_named and os.path.isfile(sibling) else None


@dataclass
class _Shape:
    shape: tuple


def _read_text(path: str, shown: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LinFusionLoadError(f"cannot read {CONFIG_FILE} of LinFusion '{shown}': {e}") from e


def _read_safetensors(path: str, shown: str):
    from safetensors import safe_open

    if not path.endswith((".safetensors", ".sft")):
        raise LinFusionLoadError(f"LinFusion file '{shown}' is not a .safetensors file; only safetensors "
                                 f"(never pickled .bin/.ckpt) are loaded")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        size = os.path.getsize(path)
        raise LinFusionLoadError(f"LinFusion file '{shown}' ({size} bytes) is not a readable safetensors file "
                                 f"(truncated or corrupt download?): {e}") from e
    if not tensors:
        raise LinFusionLoadError(f"LinFusion file '{shown}' holds no tensors")
    return tensors, metadata


def modules_from_weights(state_dict: dict[str, torch.Tensor], shown: str) -> list[ModuleSpec]:
    """Module i's dim and MLP width from its tensors; every tensor's shape is checked."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if not m:
            raise LinFusionLoadError(f"'{shown}' is not a LinFusion file: unexpected tensor '{key}' (LinFusion keys "
                                     f"look like '0.to_q.weight'). Is it a LoRA or a full checkpoint?")
        groups.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    indices = sorted(groups)
    if indices != list(range(len(indices))):
        raise LinFusionLoadError(f"'{shown}': LinFusion module indices are not 0..{len(indices) - 1} "
                                 f"(found {indices[:5]}...): the file is incomplete")
    return [_module_spec(i, groups[i], shown) for i in indices]


def _module_spec(index: int, tensors: dict[str, torch.Tensor], shown: str) -> ModuleSpec:
    def shape(name):
        if name not in tensors:
            raise LinFusionLoadError(f"'{shown}': LinFusion module {index} lacks tensor '{index}.{name}'")
        return tuple(tensors[name].shape)

    q = shape("to_q.weight")
    if len(q) != 2 or q[0] != q[1]:
        raise LinFusionLoadError(f"'{shown}': module {index} to_q.weight has shape {q}, expected C x C")
    dim = q[0]
    has_mlp = any(k.startswith(("to_q_.", "to_k_.")) for k in tensors)
    mid = shape("to_q_.0.weight")[0] if has_mlp else -1
    expected = {"to_q.weight": (dim, dim), "to_k.weight": (dim, dim), "to_v.weight": (dim, dim),
                "to_out.0.weight": (dim, dim), "to_out.0.bias": (dim,)}
    if has_mlp:
        for p in ("to_q_", "to_k_"):
            expected.update({f"{p}.0.weight": (mid, dim), f"{p}.0.bias": (mid,), f"{p}.1.weight": (mid,),
                             f"{p}.1.bias": (mid,), f"{p}.3.weight": (dim, mid), f"{p}.3.bias": (dim,)})
    for name, want in expected.items():
        if shape(name) != want:
            raise LinFusionLoadError(f"'{shown}': module {index} tensor '{name}' has shape {shape(name)}, "
                                     f"expected {want} for a {dim}-channel module")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise LinFusionLoadError(f"'{shown}': module {index} has unexpected tensors {extra}")
    return ModuleSpec(index=index, dim=dim, projection_mid_dim=mid)


def _parse_config(text: str, shown: str, source: str) -> list[dict]:
    """The modules_list of a config, with every field of the type the loader relies on."""
    expected = ('expected {"modules_list": [{"dim_n": int, "heads": int, "module_name": str, '
                '"projection_mid_dim": int or null}, ...]}')

    def bad(why: str):
        return LinFusionLoadError(f"'{shown}': the LinFusion config ({source}) is not valid: {why}; {expected}")

    try:
        config = json.loads(text)
    except ValueError as e:
        raise bad(f"it is not JSON ({e})") from e
    modules = config.get("modules_list") if isinstance(config, dict) else None
    if not isinstance(modules, list):
        raise bad("it has no modules_list list")
    for i, m in enumerate(modules):
        if not isinstance(m, dict):
            raise bad(f"modules_list[{i}] is {type(m).__name__}, not an object")
        missing = [k for k in ("dim_n", "heads", "module_name") if k not in m]
        if missing:
            raise bad(f"modules_list[{i}] lacks {', '.join(missing)}")
        ints = {k: m[k] for k in ("dim_n", "heads") if not _is_int(m[k])}
        if "projection_mid_dim" in m and m["projection_mid_dim"] is not None and not _is_int(m["projection_mid_dim"]):
            ints["projection_mid_dim"] = m["projection_mid_dim"]
        if ints:
            raise bad(f"modules_list[{i}] has non-integer " + ", ".join(f"{k}={v!r}" for k, v in ints.items()))
        if not isinstance(m["module_name"], str):
            raise bad(f"modules_list[{i}] has module_name={m['module_name']!r}, not a string")
    return modules


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _apply_config(modules: list[ModuleSpec], config: list[dict], shown: str, source: str) -> None:
    if len(config) != len(modules):
        raise LinFusionLoadError(f"'{shown}': the config ({source}) lists {len(config)} modules but the weights "
                                 f"hold {len(modules)}: config and weights do not belong together")
    for spec, entry in zip(modules, config):
        dim, heads = int(entry["dim_n"]), int(entry["heads"])
        mid = entry.get("projection_mid_dim")
        mid = dim if mid is None else int(mid)
        if dim != spec.dim or mid != spec.projection_mid_dim:
            raise LinFusionLoadError(
                f"'{shown}': the config ({source}) says module {spec.index} ({entry['module_name']}) has dim_n {dim} "
                f"and projection_mid_dim {mid}, but its weights have {spec.dim} and {spec.projection_mid_dim}: "
                f"config and weights do not belong together")
        if heads <= 0 or dim % heads:
            raise LinFusionLoadError(f"'{shown}': the config ({source}) gives module {spec.index} {heads} heads, "
                                     f"which do not divide its {dim} channels")
        spec.heads, spec.name = heads, str(entry["module_name"])

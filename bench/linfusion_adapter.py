"""The one place the benchmarks touch LinFusion: its attention module, and its nodes on a MODEL.

A model gets LinFusion the way a user's does: random weights in the hub layout (config.json +
diffusion_pytorch_model.safetensors) go into a folder of ComfyUI's `linfusion` model path, then the
"Load LinFusion" and "Apply LinFusion" nodes run on the MODEL. Nothing here re-implements the patch.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import torch

from .random_weights import fill_variance_preserving

log = logging.getLogger("LinFusion")

LOADER_NODE = "LinFusionLoader"
APPLY_NODE = "ApplyLinFusion"


def linfusion_attn1_flops(batch: int, tokens: int, dim: int, heads: int, mid_dim: int | None) -> float:
    """to_q/k/v/out (8 N C^2), the two q/k MLPs C -> m -> C (8 N C m), phi(K)^T V and Q S (4 N C d)."""
    head_dim = dim // heads
    mlp = 0 if mid_dim == -1 else 8.0 * tokens * dim * (mid_dim or dim)
    return batch * (8.0 * tokens * dim * dim + mlp + 4.0 * tokens * dim * head_dim + 2.0 * tokens * dim)


def _module_class(core):
    module = getattr(core, "module", None)
    if module is None:
        try:
            import importlib
            module = importlib.import_module(core.__name__ + ".module")
        except ImportError:
            return None
    return getattr(module, "LinFusionAttention", None)


def build_linfusion_attention(core, dim: int, heads: int, mid_dim: int | None, device, dtype):
    """linfusion_core.module.LinFusionAttention with variance-preserving random weights, or None."""
    cls = _module_class(core)
    if cls is None:
        return None
    wanted = {"dim": dim, "dim_n": dim, "query_dim": dim, "heads": heads, "n_heads": heads,
              "projection_mid_dim": mid_dim, "mid_dim": mid_dim}
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    module = cls(**kwargs)
    return fill_variance_preserving(module).to(device=device, dtype=dtype).eval()


def _diffusers_order(name: str):
    """Hub module order: every down block, then every up block, then the mid block last."""
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[name.split(".")[0]]
    return (group, [int(p) for p in re.findall(r"\.(\d+)", name)])


def linfusion_state_dict(patcher, mid_dim_divisor: int | None, seed: int = 0):
    """(config, state dict) in the hub layout for every attn1 of the MODEL, with random 16-bit weights."""
    import comfy.utils

    diffusion_model = patcher.model.diffusion_model
    to_ldm = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    suffix = ".to_q.weight"
    names = sorted({k[: -len(suffix)] for k in to_ldm if k.endswith(".attn1" + suffix)}, key=_diffusers_order)
    gen = torch.Generator().manual_seed(seed)
    modules, sd = [], {}
    for i, name in enumerate(names):
        attn = diffusion_model.get_submodule(to_ldm[name + suffix][: -len(suffix)])
        dim = attn.to_q.in_features
        mid = None if mid_dim_divisor is None else dim // mid_dim_divisor
        m = mid or dim
        modules.append({"dim_n": dim, "heads": attn.heads, "module_name": name, "projection_mid_dim": mid})

        def rnd(*shape):
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = fan_in ** -0.5 if len(shape) > 1 else 0.0
            return (torch.randn(*shape, generator=gen) * std).to(torch.float16)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[f"{i}.{proj}.weight"] = rnd(dim, dim)
        sd[f"{i}.to_out.0.bias"] = torch.zeros(dim, dtype=torch.float16)
        for mlp in ("to_q_", "to_k_"):
            sd[f"{i}.{mlp}.0.weight"] = rnd(m, dim)
            sd[f"{i}.{mlp}.0.bias"] = torch.zeros(m, dtype=torch.float16)
            sd[f"{i}.{mlp}.1.weight"] = torch.ones(m, dtype=torch.float16)
            sd[f"{i}.{mlp}.1.bias"] = torch.zeros(m, dtype=torch.float16)
            sd[f"{i}.{mlp}.3.weight"] = rnd(dim, m)
            sd[f"{i}.{mlp}.3.bias"] = torch.zeros(dim, dtype=torch.float16)
    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules}
    return config, sd


def write_hub_folder(folder: Path, config: dict, sd: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _run_node(node_cls, **kwargs):
    """Call a classic node's FUNCTION (or a v3 node's execute) and return its output tuple."""
    if hasattr(node_cls, "FUNCTION"):
        return getattr(node_cls(), node_cls.FUNCTION)(**kwargs)
    out = node_cls.execute(**kwargs)
    return getattr(out, "result", out)


def _defaults(node_cls, skip: set) -> dict:
    """Every other input of a node at its declared default (the settings a user starts from)."""
    spec = node_cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            if name in skip:
                continue
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            if "default" in opts:
                kwargs[name] = opts["default"]
            elif isinstance(decl[0], list) and decl[0]:
                kwargs[name] = decl[0][0]
    return kwargs


def apply_linfusion(patcher, linfusion_name: str):
    """The MODEL with LinFusion applied by the extension's own nodes, with their default options."""
    import nodes

    mapping = nodes.NODE_CLASS_MAPPINGS
    if LOADER_NODE not in mapping or APPLY_NODE not in mapping:
        return None
    loader, apply = mapping[LOADER_NODE], mapping[APPLY_NODE]
    (linfusion,) = _run_node(loader, **{**_defaults(loader, {"linfusion_name"}), "linfusion_name": linfusion_name})[:1]
    spec = {**apply.INPUT_TYPES().get("required", {}), **apply.INPUT_TYPES().get("optional", {})}
    model_key = next(k for k, v in spec.items() if v[0] == "MODEL")
    lin_key = next(k for k, v in spec.items() if v[0] == "LINFUSION")
    kwargs = {**_defaults(apply, {model_key, lin_key}), model_key: patcher, lin_key: linfusion}
    return _run_node(apply, **kwargs)[0]

"""Which LinFusion module goes on which attn1 of a given model, checked before anything is patched."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .block_map import Attn1Site, attn1_sites
from ..weights.checkpoint import LinFusionLoadError, LinFusionWeights, ModuleSpec, families_compatible

log = logging.getLogger("LinFusion")

# ComfyUI model_config class names, for messages.
FAMILY_BY_CONTEXT_DIM = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}


@dataclass(frozen=True)
class Placement:
    spec: ModuleSpec
    site: Attn1Site


def model_family(base_model) -> str:
    """SD1.x / SD2.x / SDXL / ... of a ComfyUI BaseModel, from its UNet config (finetunes included)."""
    config = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
    return FAMILY_BY_CONTEXT_DIM.get(config.get("context_dim"), "unknown")


def model_label(base_model) -> str:
    config = getattr(base_model, "model_config", None)
    return f"{model_family(base_model)} ({type(config).__name__ if config is not None else type(base_model).__name__})"


def unet_sites(base_model) -> list[Attn1Site]:
    """The model's attn1 sites, or a clear error for models LinFusion has no weights for (Flux, SD3, ...)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = getattr(base_model, "diffusion_model", None)
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
    if not isinstance(diffusion_model, UNetModel) or "num_res_blocks" not in unet_config:
        name = type(getattr(base_model, "model_config", base_model)).__name__
        raise LinFusionLoadError(f"LinFusion works on SD1.x, SD2.x and SDXL UNets; this model is {name} "
                                 f"({type(diffusion_model).__name__}), which has no LinFusion weights")
    sites = attn1_sites(diffusion_model, unet_config)
    if not sites:
        raise LinFusionLoadError(f"this {model_label(base_model)} UNet has no self-attention to replace")
    return sites


def place_modules(weights: LinFusionWeights, base_model) -> list[Placement]:
    """Pair every LinFusion module with a model attn1, or raise naming the file, the family found and the
    family expected. Pure check: nothing is modified."""
    sites = unet_sites(base_model)
    shown = os.path.basename(weights.source.rstrip("/"))
    found, expected = weights.family, model_family(base_model)
    model_dims = "/".join(str(d) for d in sorted({s.dim for s in sites}))
    mismatch = (f"'{shown}' holds LinFusion weights for {found} ({len(weights.modules)} modules, dims "
                f"{'/'.join(str(d) for d in sorted({m.dim for m in weights.modules}))}), but the model is "
                f"{model_label(base_model)} with {len(sites)} self-attention modules, dims {model_dims}")
    if not families_compatible(found, expected):
        raise LinFusionLoadError(mismatch + f". Load the LinFusion weights made for {expected}.")
    if len(weights.modules) != len(sites):
        raise LinFusionLoadError(mismatch + ": module counts differ.")

    if all(m.name is not None for m in weights.modules):
        by_name = {s.diffusers_name: s for s in sites}
        pairs = []
        for spec in weights.modules:
            site = by_name.get(spec.name)
            if site is None:
                raise LinFusionLoadError(mismatch + f": the model has no module '{spec.name}'.")
            pairs.append(Placement(spec, site))
        if len({p.site.comfy_path for p in pairs}) != len(sites):
            raise LinFusionLoadError(f"'{shown}': its config names some modules twice")
    else:
        # No names: the file order is diffusers named_modules() order (down, up, mid last).
        pairs = [Placement(spec, site) for spec, site in zip(weights.modules, sites)]

    check_pairs(pairs, mismatch, "the model", f" Load the LinFusion weights made for {expected}.")
    return pairs


def check_pairs(pairs: list[Placement], mismatch: str, target: str, advice: str = "") -> None:
    """Every module has its site's channels and, where the file says, its head count; else raise `mismatch`."""
    for p in pairs:
        if p.spec.dim != p.site.dim:
            raise LinFusionLoadError(mismatch + f": module {p.spec.index} has {p.spec.dim} channels where "
                                     f"{p.site.diffusers_name} has {p.site.dim}.")
        if p.spec.heads is not None and p.spec.heads != p.site.heads:
            raise LinFusionLoadError(mismatch + f": module {p.spec.index} ({p.site.diffusers_name}) was made for "
                                     f"{p.spec.heads} heads, {target} uses {p.site.heads}.{advice}")


def assumed_family_note(weights: LinFusionWeights, base_model) -> str | None:
    """What a user must be told when the file cannot show its family (a renamed SD 1.x / SD 2.x file without
    config): the family and heads were taken from the model, so wrong-family weights would run without error."""
    if not weights.family_ambiguous:
        return None
    shown = os.path.basename(weights.source.rstrip("/"))
    heads = "/".join(str(h) for h in sorted({s.heads for s in unet_sites(base_model)}))
    other = {"SD1.x": "SD2.x", "SD2.x": "SD1.x"}.get(model_family(base_model), "another family")
    return (f"family ASSUMED from the model: '{shown}' has no config (no config.json beside it, none in its "
            f"metadata) and SD 1.x and SD 2.x LinFusion files have identical tensors, so it was applied as "
            f"{model_family(base_model)} weights with the model's {heads} heads. If it is a {other} file, the "
            f"images will be wrong without any error; use the hub folder (config.json + weights) to have the "
            f"family checked")

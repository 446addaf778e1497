"""Installing LinFusion into a ComfyUI MODEL (a ModelPatcher clone), and taking it out again.

Design (why not object patches): ComfyUI's module tree and state dict stay exactly as loaded.
  - The LinFusion weights live in their own nn.Module (`LinFusionModules`, comfy.ops layers) wrapped in
    their own ModelPatcher, registered with `set_additional_models("linfusion", ...)`. ComfyUI then loads,
    offloads, casts and counts them like any model it manages (low-VRAM, fp8 storage, memory estimates).
  - A `PatcherInjection` is the switch: inject() gives each chosen attn1 an instance-level `forward` that
    runs its LinFusion module; eject() deletes it. ComfyUI injects after loading a patcher and ejects before
    it unloads, detaches or switches to another clone of the same model, so the plain clone never sees
    LinFusion. `injections` and `additional_models` keys are part of `clone_has_same_weights()`, so newer
    ComfyUI's "same weights, skip reload" shortcut cannot confuse a LinFusion clone with a plain one.
  - Because the tree is untouched, saving a checkpoint, model merging and ControlLoRA read the base model's
    own attn1 weights, and LoRA deltas land on those weights. LinFusion runs its own distilled weights and
    ignores attn1 LoRA deltas (logged with their count): the released modules were trained from scratch,
    not from attn1, so a LoRA delta for attn1 has no meaning for them.
  - Multi-GPU (newer ComfyUI): a per-GPU deep clone of the MODEL rebuilds every additional model from its
    `cached_patcher_init` factory, so the LinFusion patcher carries one (`modules_patcher`), and inject()
    runs the modules of the patcher it is injected into, not the ones it was built with.
  - attn1_replace users (SAG, PAG) call attn1.to_q/to_k/to_v/to_out themselves and never reach forward():
    on those blocks their softmax attention runs with the base model's weights (logged when visible).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from torch import nn

from ..weights.checkpoint import LinFusionWeights
from ..dynamic_vram import patcher_class
from ..attention.module import LinFusionAttention
from .placement import Placement, assumed_family_note, model_label, place_modules

log = logging.getLogger("LinFusion")

INJECTION_KEY = "linfusion"
# transformer_options key for LinFusion's token chunk size (set by LinFusion Low-Memory Mode).
LINEAR_ATTENTION_CHUNK_KEY = "linfusion_chunk_size"
BLOCK_CHOICES = ("all", "highest resolution only")
AUTO = "auto"          # min_tokens: softmax on the levels where it is measured faster (auto_min_tokens.py)


class LinFusionModules(nn.Module):
    """The LinFusion modules of one patched model (ComfyUI loads/offloads this as an additional model)."""

    def __init__(self, modules: list[LinFusionAttention]):
        super().__init__()
        self.blocks = nn.ModuleList(modules)


class LinFusionForward:
    """The instance-level forward an injected attn1 gets. Below `min_tokens` it runs the attn1 it replaced
    (softmax, exact SD at native sizes); at or above, the LinFusion module."""

    def __init__(self, linfusion: LinFusionAttention, min_tokens: int, previous):
        self.linfusion = linfusion
        self.min_tokens = min_tokens
        self.previous = previous  # bound forward that was there before (normally the class forward)

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}, **kwargs):
        if mask is not None or x.shape[1] < self.min_tokens:
            return self.previous(x, context=context, value=value, mask=mask,
                                 transformer_options=transformer_options, **kwargs)
        # Low-memory mode sets a token chunk size for the whole model call (0 or absent: the default).
        return self.linfusion(x, context=context, value=value,
                              chunk_size=transformer_options.get(LINEAR_ATTENTION_CHUNK_KEY) or None)


@dataclass
class LinFusionInstall:
    """What one ApplyLinFusion installs: the placements, their modules, and the switch. min_tokens: one
    threshold for every placement, or one per placement (min_tokens = auto: each width its own)."""
    placements: list[Placement]
    modules: LinFusionModules
    min_tokens: int | list[int]

    def min_tokens_of(self, index: int) -> int:
        return self.min_tokens[index] if isinstance(self.min_tokens, list) else self.min_tokens

    def inject(self, patcher) -> None:
        diffusion_model = patcher.model.diffusion_model
        for index, (placement, module) in enumerate(zip(self.placements, self.modules_of(patcher).blocks)):
            attn1 = diffusion_model.get_submodule(placement.site.comfy_path)
            current = attn1.__dict__.get("forward")
            if isinstance(current, LinFusionForward):
                if current.linfusion is module:
                    continue
                current = current.previous_instance_forward
            forward = LinFusionForward(module, self.min_tokens_of(index), current or attn1.forward)
            forward.previous_instance_forward = current
            attn1.forward = forward
        self._log_bypassed(patcher)

    def modules_of(self, patcher) -> LinFusionModules:
        """The modules `patcher` registered as its LinFusion additional model: a multi-GPU copy of the MODEL
        has its own, on its own device. Falls back to the modules this install was built with."""
        for extra in patcher.get_additional_models_with_key(INJECTION_KEY):
            if isinstance(extra.model, LinFusionModules) and len(extra.model.blocks) == len(self.placements):
                return extra.model
        return self.modules

    def prepare(self, patcher) -> None:
        """ON_PRE_RUN (the models are loaded, nothing has run yet): the modules' fast-path weights are packed
        here, eagerly, so a torch.compile'd model (TorchCompileModel) finds them cached instead of tracing the
        packing into its first graph and compiling again once they are stored."""
        from ..attention.fast_path import prepare

        for module in self.modules_of(patcher).blocks:
            prepare(module)

    def release(self, patcher) -> None:
        """ON_CLEANUP (the sampler is done): the packed weights go, so between runs they hold no device memory that
        ComfyUI's accounting does not see (a low-VRAM partial unload moves single layers, not the module that
        holds the cache); the next ON_PRE_RUN packs again (no recompile: a compiled graph takes them as inputs)."""
        for module in self.modules_of(patcher).blocks:
            module._linfusion_packed = None

    def eject(self, patcher) -> None:
        # Plain attribute work only, no imports: ComfyUI's ModelPatcher.__del__ ejects at interpreter exit,
        # when importing fails ("sys.meta_path is None") and Python prints the error as "Exception ignored".
        diffusion_model = patcher.model.diffusion_model
        for placement in self.placements:
            attn1 = diffusion_model.get_submodule(placement.site.comfy_path)
            current = attn1.__dict__.get("forward")
            if isinstance(current, LinFusionForward):
                if current.previous_instance_forward is None:
                    del attn1.forward
                else:
                    attn1.forward = current.previous_instance_forward

    def _log_bypassed(self, patcher) -> None:
        prefixes = tuple(f"diffusion_model.{p.site.comfy_path}." for p in self.placements)
        lora_keys = sum(1 for k in patcher.patches if k.startswith(prefixes))
        replaced = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        message = (lora_keys, tuple(sorted(map(str, replaced))))
        if message == getattr(self, "_last_logged", (0, ())):
            return
        self._last_logged = message
        if lora_keys:
            log.warning("[LinFusion] %d LoRA/weight patches target self-attention (attn1) weights that LinFusion "
                        "replaces; LinFusion runs its own distilled weights, so they have no effect there "
                        "(they still apply to the rest of the model)", lora_keys)
        if replaced:
            log.warning("[LinFusion] another node replaces attn1 on blocks %s (e.g. Self-Attention Guidance); "
                        "there its own softmax attention runs with the base model's attn1 weights instead of "
                        "LinFusion", ", ".join(message[1]))


def select_placements(placements: list[Placement], blocks: str) -> list[Placement]:
    if blocks == "all":
        return placements
    if blocks == "highest resolution only":
        # The smallest attention width is the level with the most tokens: where quadratic cost bites.
        dim = min(p.site.dim for p in placements)
        return [p for p in placements if p.site.dim == dim]
    raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {blocks!r}")


def stored_as(state_dict: dict, dtype) -> dict:
    """The tensors in the model's storage dtype. Needed because under ComfyUI 0.33's DynamicVRAM (its default
    on NVIDIA) comfy.ops layers make no weight until load_state_dict and then keep the *loaded* tensor's dtype:
    an fp16 file would give fp16 modules in an fp32 model. Converting first gives what the classic path gives
    (load_state_dict copies into parameters of `dtype`), whichever path the host takes."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def build_modules(weights: LinFusionWeights, placements: list[Placement], dtype, compute_dtype,
                  device=None) -> LinFusionModules:
    """LinFusion modules in the model's storage dtype, on comfy.ops layers that cast like the UNet's."""
    import comfy.ops

    operations = comfy.ops.manual_cast if compute_dtype is not None else comfy.ops.disable_weight_init
    modules = []
    for p in placements:
        module = LinFusionAttention(p.spec.dim, p.site.heads, p.spec.projection_mid_dim, dtype=dtype,
                                    device=device, operations=operations)
        module.load_state_dict(stored_as(weights.module_state_dict(p.spec.index), dtype), strict=True)
        modules.append(module)
    return LinFusionModules(modules).eval().requires_grad_(False)


def modules_patcher(weights: LinFusionWeights, placements: list[Placement], dtype, compute_dtype, load_device,
                    offload_device, disable_dynamic: bool = False):
    """A ModelPatcher holding freshly built LinFusion modules, of the host's default patcher class as core's own
    model patches make theirs (0.33's CoreModelPatcher: ModelPatcherDynamic under DynamicVRAM, so loading the
    UNet with LinFusion does not force ComfyUI's non-dynamic memory freeing; `disable_dynamic` asks for the
    classic ModelPatcher). It is also that patcher's `cached_patcher_init` factory: newer ComfyUI calls it to
    give each GPU of a multi-GPU run, or a non-dynamic delegate, its own untouched copy."""
    modules = build_modules(weights, placements, dtype, compute_dtype, device=offload_device)
    patcher = patcher_class(disable_dynamic)(modules, load_device=load_device, offload_device=offload_device)
    patcher.cached_patcher_init = (modules_patcher, (weights, placements, dtype, compute_dtype, load_device,
                                                     offload_device))
    return patcher


def auto_min_tokens(model, weights: LinFusionWeights, placements: list[Placement]) -> tuple[list[int], str]:
    """min_tokens = auto: each placement's threshold is the measured crossover of its width on the model's
    load device and compute dtype, with the softmax the model would run; and a summary naming them."""
    from ..attention.auto_min_tokens import crossover_tokens

    base_model = model.model
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    options = model.model_options.get("transformer_options", {})
    by_width, started = {}, time.perf_counter()
    for p in placements:
        key = (p.site.dim, p.site.heads, p.spec.projection_mid_dim)
        if key not in by_width:
            by_width[key] = crossover_tokens(*key, model.load_device, dtype, options,
                                             linfusion_state=weights.module_state_dict(p.spec.index))
    seconds = time.perf_counter() - started
    parts = []
    for (dim, heads, mid), tokens in sorted(by_width.items()):
        blocks = sorted({p.site.comfy_path.split(".transformer_blocks")[0] for p in placements if p.site.dim == dim})
        side = math.isqrt(max(tokens - 1, 0)) + 1 if tokens else 0
        parts.append(f"C={dim} ({', '.join(blocks)}): " + (
            "LinFusion at every size" if tokens == 0 else
            f"softmax below {tokens} tokens (latent side < {side} at that level), LinFusion from there"))
    summary = (f"min_tokens auto ({model.load_device}, {str(dtype).replace('torch.', '')}, measured in "
               f"{seconds:.2f} s or cached): " + "; ".join(parts))
    return [by_width[(p.site.dim, p.site.heads, p.spec.projection_mid_dim)] for p in placements], summary


def apply_linfusion(model, weights: LinFusionWeights, blocks: str = "all", min_tokens: int | str = 0):
    """A clone of `model` (ModelPatcher) running LinFusion; returns (clone, human-readable summary).
    min_tokens: blocks with fewer tokens keep softmax; AUTO picks that threshold per width from a measured
    crossover. All checks run before the clone exists, so a bad file leaves nothing half-patched."""
    import comfy.patcher_extension

    base_model = model.model
    every = place_modules(weights, base_model)
    placements = select_placements(every, blocks)
    auto_note = None
    if min_tokens == AUTO:
        thresholds, auto_note = auto_min_tokens(model, weights, placements)
    else:
        thresholds = int(min_tokens)
    linfusion_patcher = modules_patcher(weights, placements, base_model.get_dtype(), base_model.manual_cast_dtype,
                                        model.load_device, model.offload_device)
    install = LinFusionInstall(placements, linfusion_patcher.model, thresholds)

    patched = model.clone()
    if patched.get_injections(INJECTION_KEY):
        log.info("[LinFusion] the model already had LinFusion applied; replacing it")
    patched.set_additional_models(INJECTION_KEY, [linfusion_patcher])
    patched.set_injections(INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(install.inject, install.eject)])
    callbacks = comfy.patcher_extension.CallbacksMP
    for call_type, callback in ((callbacks.ON_PRE_RUN, install.prepare), (callbacks.ON_CLEANUP, install.release)):
        patched.remove_callbacks_with_key(call_type, INJECTION_KEY)
        patched.add_callback_with_key(call_type, INJECTION_KEY, callback)

    summary = (f"LinFusion {os.path.basename(weights.source.rstrip('/'))} ({weights.family}, config from "
               f"{weights.config_source}) on {model_label(base_model)}: {len(placements)} of {len(every)} self-attention "
               f"modules patched" + (f"; {auto_note}" if auto_note else
                                     f"; softmax kept below {min_tokens} tokens" if thresholds > 0 else ""))
    log.info("[LinFusion] %s", summary)
    note = assumed_family_note(weights, base_model)
    if note:
        log.warning("[LinFusion] %s", note)
        summary += f". WARNING: {note}."
    return patched, summary


def linfusion_install(model) -> LinFusionInstall | None:
    """The LinFusionInstall of a patched MODEL, for nodes built on top (tiled UNet, low-memory mode)."""
    injections = model.get_injections(INJECTION_KEY) or []
    for inj in injections:
        owner = getattr(inj.inject, "__self__", None)
        if isinstance(owner, LinFusionInstall):
            return owner
    return None


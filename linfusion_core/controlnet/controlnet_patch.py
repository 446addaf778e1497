"""LinFusion inside a ControlNet: the ControlNet's own self-attention (attn1 of every BasicTransformerBlock of
its input and middle blocks, which mirror the UNet's) runs LinFusion linear attention, so a high-resolution
ControlNet step stops paying the quadratic cost Apply LinFusion removed from the UNet.

Mechanism (why not object patches or transformer_options):
  - ComfyUI 0.3.75's cldm.ControlNet calls its blocks as `module(h, emb, context)`: no transformer_options
    reach its SpatialTransformers, so attn1 patches in a model's options never reach the ControlNet.
  - `ControlNet.copy()` shares `control_model` between all copies (Apply ControlNet makes one per use), so a
    change of the module tree would leak into the input ControlNet and every other copy of it.
  - The patched copy is an instance of a subclass of the ControlNet's own class. Its get_control installs
    instance-level forwards (patch.LinFusionForward) on the attn1 modules for the duration of its own model
    call only, and takes them out in `finally` (errors and interruption included). A chained previous
    ControlNet is evaluated before the install, so a plain copy of the same file chained before ours still
    runs softmax. Strength, start/end and chaining are ComfyUI's own code, unchanged.
  - The LinFusion weights live in their own ModelPatcher that get_models() returns, so ComfyUI loads,
    offloads and counts them with the ControlNet.
  - ControlLoRA builds its network from the UNet at sampling time (pre_run); its modules are placed and built
    at its first call, on the device and dtype it runs in. T2I-Adapters have no attention: left as they are.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..patching.block_map import attn1_sites
from ..weights.checkpoint import LinFusionLoadError, LinFusionWeights, families_compatible
from ..patching.patch import LinFusionForward, build_modules, modules_patcher
from ..patching.placement import FAMILY_BY_CONTEXT_DIM, Placement, check_pairs

log = logging.getLogger("LinFusion")

SOURCE_BASE = "base modules"
SOURCE_DISTILLED = "distilled for this ControlNet"
SOURCES = (SOURCE_BASE, SOURCE_DISTILLED)


# ------------------------------------------------------------------------------------ where the modules go

def _transformer_depth(block) -> int:
    from comfy.ldm.modules.attention import SpatialTransformer

    for layer in block:
        if isinstance(layer, SpatialTransformer):
            return len(layer.transformer_blocks)
    return 0


def control_unet_config(control_model) -> dict:
    """What comfy.utils.unet_to_diffusers needs, read from a cldm.ControlNet's own tree (it keeps no config):
    transformer depths of its input and middle blocks; it has no output blocks."""
    num_res_blocks = list(control_model.num_res_blocks)
    depths, index = [], 1
    for level, count in enumerate(num_res_blocks):
        for _ in range(count):
            depths.append(_transformer_depth(control_model.input_blocks[index]))
            index += 1
        index += 1  # the downsampler
    return {"num_res_blocks": num_res_blocks, "channel_mult": list(control_model.channel_mult),
            "transformer_depth": depths, "transformer_depth_output": [0] * sum(n + 1 for n in num_res_blocks),
            "transformer_depth_middle": _transformer_depth(control_model.middle_block)}


def control_sites(control_model):
    """The ControlNet's attn1 sites with the diffusers names of the UNet blocks they mirror (down, then mid)."""
    return attn1_sites(control_model, control_unet_config(control_model))


def control_family(control_model, sites) -> str:
    import comfy.utils

    attn2 = comfy.utils.get_attr(control_model, sites[0].comfy_path[: -len("attn1")] + "attn2")
    return FAMILY_BY_CONTEXT_DIM.get(attn2.to_k.in_features, "unknown")


def place_control_modules(weights: LinFusionWeights, control_model) -> list[Placement]:
    """Pair a LinFusion module with every ControlNet attn1, or raise naming the file and what differs.

    Weights made for the UNet hold down, up and mid modules; the ControlNet takes the down and mid ones (by
    name, or for a file without config by the hub order: down first, mid last). Pure check."""
    sites = control_sites(control_model)
    shown = os.path.basename(weights.source.rstrip("/"))
    if not sites:
        raise LinFusionLoadError("this ControlNet has no self-attention to replace")
    family = control_family(control_model, sites)
    dims = "/".join(str(d) for d in sorted({s.dim for s in sites}))
    mismatch = (f"'{shown}' holds LinFusion weights for {weights.family} ({len(weights.modules)} modules), but the "
                f"ControlNet is {family} with {len(sites)} self-attention modules, dims {dims}")
    if not families_compatible(weights.family, family):
        raise LinFusionLoadError(mismatch + f". Load the LinFusion weights made for {family}.")

    if all(m.name is not None for m in weights.modules):
        by_name = {m.name: m for m in weights.modules}
        missing = [s.diffusers_name for s in sites if s.diffusers_name not in by_name]
        if missing:
            raise LinFusionLoadError(mismatch + f": no module for {', '.join(missing[:3])}"
                                     + (" ..." if len(missing) > 3 else ""))
        pairs = [Placement(by_name[s.diffusers_name], s) for s in sites]
    else:
        down = [s for s in sites if s.level == "down_blocks"]
        mid = [s for s in sites if s.level == "mid_block"]
        if len(weights.modules) < len(sites):
            raise LinFusionLoadError(mismatch + ": too few modules.")
        specs = weights.modules[: len(down)] + (weights.modules[-len(mid):] if mid else [])
        pairs = [Placement(spec, site) for spec, site in zip(specs, down + mid)]
    check_pairs(pairs, mismatch, "the ControlNet")
    return pairs


# ------------------------------------------------------------------------------------ the switch

@dataclass(eq=False)
class ControlLinFusion:
    """The LinFusion modules of one patched ControlNet, shared by all its copies (as control_model is)."""
    weights: LinFusionWeights
    source: str
    placements: list[Placement] | None = None   # a ControlNet: placed up front; ControlLoRA: at its first call
    patcher: object | None = None                # ModelPatcher of the modules (ComfyUI loads it)
    _lazy: dict = field(default_factory=dict)    # ControlLoRA: (paths, dtype, device) -> modules

    def models(self) -> list:
        return [self.patcher] if self.patcher is not None else []

    def for_device(self, device) -> "ControlLinFusion":
        """The same LinFusion with modules of its own on `device`, for a ControlNet's per-GPU deep copy: the
        shared modules live on the first GPU. The patcher's own factory (cached_patcher_init) builds them, as
        ComfyUI rebuilds a model's additional models for another GPU."""
        if self.patcher is None:   # ControlLoRA: built at the copy's first call, on the device it runs on
            return ControlLinFusion(self.weights, self.source)
        factory, args = self.patcher.cached_patcher_init[:2]
        weights, placements, dtype, compute_dtype, _, offload_device = args
        return ControlLinFusion(self.weights, self.source, self.placements,
                                factory(weights, placements, dtype, compute_dtype, device, offload_device))

    def pairs(self, control, device):
        if self.patcher is not None:
            return list(zip(self.placements, self.patcher.model.blocks))
        placements = place_control_modules(self.weights, control.control_model)
        dtype = getattr(control.control_model, "dtype", None)
        key = (tuple(p.site.comfy_path for p in placements), dtype, str(device))
        if key not in self._lazy:
            self._lazy.clear()
            self._lazy[key] = build_modules(self.weights, placements, dtype, control.manual_cast_dtype, device=device)
        return list(zip(placements, self._lazy[key].blocks))

    @contextmanager
    def installed(self, control, device):
        """LinFusion forwards on the ControlNet's attn1 modules while the block runs, never after."""
        import comfy.utils

        installed = []
        try:
            for placement, module in self.pairs(control, device):
                attn1 = comfy.utils.get_attr(control.control_model, placement.site.comfy_path)
                current = attn1.__dict__.get("forward")
                attn1.forward = LinFusionForward(module, 0, current or attn1.forward)
                installed.append((attn1, current))
            yield len(installed)
        finally:
            for attn1, current in reversed(installed):
                if current is None:
                    attn1.__dict__.pop("forward", None)
                else:
                    attn1.forward = current


class _Computed:
    """Stands in for the previous ControlNet during our call: its result, computed before our install."""

    def __init__(self, control):
        self.control = control

    def get_control(self, *args, **kwargs):
        return self.control


class LinFusionControlMixin:
    """Put before a ComfyUI ControlNet class: its model call runs with LinFusion self-attention."""
    linfusion: ControlLinFusion

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        return self.linfusion_get_control(super().get_control, x_noisy, t, cond, batched_number, transformer_options)

    def linfusion_get_control(self, inner, x_noisy, t, cond, batched_number, transformer_options):
        previous = self.previous_controlnet
        if previous is not None:
            self.previous_controlnet = _Computed(previous.get_control(x_noisy, t, cond, batched_number,
                                                                      transformer_options))
        try:
            with self.linfusion.installed(self, x_noisy.device):
                return inner(x_noisy, t, cond, batched_number, transformer_options)
        finally:
            self.previous_controlnet = previous

    def copy(self):
        c = super().copy()
        c.__class__ = type(self)
        c.linfusion = self.linfusion
        wrap_instance_get_control(c)
        return c

    def get_models(self):
        return super().get_models() + self.linfusion.models()

    def deepclone_multigpu(self, load_device, autoregister=False):
        """ComfyUI 0.33's MultiGPU CFG Split deep-copies each ControlNet per extra GPU (through copy(), which
        shares our modules): give that copy LinFusion modules on its own GPU."""
        c = super().deepclone_multigpu(load_device, autoregister=autoregister)
        c.linfusion = self.linfusion.for_device(load_device)
        return c


class _InstanceGetControl:
    """An instance-level get_control (Advanced-ControlNet's AdvancedControlBase sets `self.get_control =
    self.get_control_inject` in __init__, which hides any class's get_control) run inside LinFusion's install."""

    def __init__(self, control, inner):
        self.control, self.inner = control, inner

    def __call__(self, x_noisy, t, cond, batched_number, transformer_options):
        return self.control.linfusion_get_control(self.inner, x_noisy, t, cond, batched_number, transformer_options)


def wrap_instance_get_control(control) -> None:
    """Without this, a ControlNet whose get_control is an instance attribute would silently run softmax."""
    inner = control.__dict__.get("get_control")
    if inner is not None and not isinstance(inner, _InstanceGetControl):
        control.get_control = _InstanceGetControl(control, inner)


_CLASSES: dict[type, type] = {}


def linfusion_control_class(cls: type) -> type:
    if issubclass(cls, LinFusionControlMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LinFusion{cls.__name__}", (LinFusionControlMixin, cls), {})
    return _CLASSES[cls]


def is_linfusion_control(control) -> bool:
    return isinstance(control, LinFusionControlMixin)


def apply_linfusion_controlnet(control_net, weights: LinFusionWeights, source: str = SOURCE_BASE):
    """A copy of `control_net` whose self-attention runs LinFusion; returns (copy, summary). The input and its
    other copies are untouched. A T2I-Adapter (no attention) comes back as it is, with a summary saying so."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management

    if isinstance(control_net, comfy.controlnet.T2IAdapter):
        summary = "T2I-Adapter: it has no attention layers, so LinFusion has nothing to replace; returned unchanged"
        log.info("[LinFusion] %s", summary)
        return control_net, summary
    if not isinstance(control_net, comfy.controlnet.ControlNet):
        raise LinFusionLoadError(f"LinFusion ControlNet takes SD 1.x / 2.x / SDXL ControlNets, ControlLoRAs and "
                                 f"T2I-Adapters; got a {type(control_net).__name__}")
    shown = os.path.basename(weights.source.rstrip("/"))
    lora = isinstance(control_net, comfy.controlnet.ControlLora)
    if lora:
        install = ControlLinFusion(weights, source)
        where = "ControlLoRA: modules placed when sampling starts (it is built from the UNet then)"
    else:
        control_model = control_net.control_model
        if not isinstance(control_model, comfy.cldm.cldm.ControlNet):
            raise LinFusionLoadError(f"LinFusion has weights for SD 1.x / 2.x / SDXL ControlNets; this ControlNet "
                                     f"is a {type(control_model).__name__}")
        placements = place_control_modules(weights, control_model)
        patcher = modules_patcher(weights, placements, control_model.dtype, control_net.manual_cast_dtype,
                                  control_net.load_device, comfy.model_management.unet_offload_device())
        install = ControlLinFusion(weights, source, placements, patcher)
        family = control_family(control_model, [p.site for p in placements])
        where = f"{len(placements)} self-attention modules patched ({family})"

    patched = control_net.copy()
    if is_linfusion_control(control_net):
        log.info("[LinFusion] the ControlNet already had LinFusion; replacing it")
    patched.__class__ = linfusion_control_class(type(control_net))
    patched.linfusion = install
    wrap_instance_get_control(patched)
    summary = f"LinFusion in the ControlNet ({source}, from {shown}): {where}"
    log.info("[LinFusion] %s", summary)
    return patched, summary

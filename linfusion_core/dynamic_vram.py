"""ComfyUI 0.33's DynamicVRAM (its default on NVIDIA GPUs), as the engine meets it.

Under it `comfy.model_patcher.CoreModelPatcher` is ModelPatcherDynamic: weights stay where they were loaded
(in the file's dtype) and are moved and cast to the model's dtype per op, memory is given back on demand
(comfy-aimdo), and `comfy.ops` layers make no weight until a state dict is loaded. Older ComfyUI has none of
it; these helpers answer for both.
"""
from __future__ import annotations


def is_dynamic(patcher) -> bool:
    """A ModelPatcherDynamic (DynamicVRAM on); False on older ComfyUI, which has no such patcher."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def patcher_class(disable_dynamic: bool = False):
    """The patcher class core gives its own models (and model patches): CoreModelPatcher where the host has
    one (ModelPatcherDynamic under DynamicVRAM), else ModelPatcher; `disable_dynamic` asks for the classic one."""
    import comfy.model_patcher

    if disable_dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)

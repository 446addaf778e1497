"""ComfyUI 0.33's GPU default, DynamicVRAM, switched on inside a CPU test session, as far as it runs without CUDA.

On an NVIDIA GPU, 0.33's main.py (unless --cpu, --highvram, --gpu-only, --novram or --disable-dynamic-vram):
  1. comfy_aimdo.control.init()                 loads comfy-aimdo's library;
  2. comfy_aimdo.control.init_devices(...)      registers the CUDA devices;
  3. comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic;
  4. comfy.memory_management.aimdo_enabled = True.
This mode does 1, 3 and 4. What that runs here as on a GPU: comfy.ops layers that make no weight until
load_state_dict and keep the loaded tensor's dtype; safetensors files read through comfy-aimdo's mmap loader;
every core loader and model patch building CoreModelPatcher; models starting on the CPU. What cannot run here:
  - step 2 (it needs CUDA devices);
  - a ModelPatcherDynamic for a CPU load device: its own __new__ returns a classic ModelPatcher, so a model
    that runs on the CPU is a classic patcher in this mode too;
  - ModelPatcherDynamic.load(): it needs a comfy-aimdo virtual buffer on a CUDA device, so the per-op moving and
    casting of dynamic weights does not run. A ModelPatcherDynamic can be built for a CUDA device *object*
    (`dynamic_patcher`), which runs is_dynamic(), clone() and the cached_patcher_init paths, never a load.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

CUDA0 = torch.device("cuda", 0)   # a device object only: nothing is allocated on it
# comfy-aimdo's modules that bind its library at import (`lib = control.lib`).
AIMDO_LIBRARY_USERS = ("comfy_aimdo.host_buffer", "comfy_aimdo.model_mmap", "comfy_aimdo.model_vbar",
                       "comfy_aimdo.vram_buffer")


def host_has_dynamic_vram() -> bool:
    import comfy.model_patcher
    return hasattr(comfy.model_patcher, "ModelPatcherDynamic")


def load_aimdo() -> None:
    """Step 1. main.py runs it before anything imports comfy-aimdo's modules, which bind the library when they are
    imported; in a session started with --cpu they were imported without it, so they are bound again here."""
    import importlib

    import comfy_aimdo.control

    if not comfy_aimdo.control.init():
        raise RuntimeError("comfy-aimdo's library did not load: the DynamicVRAM mode cannot run")
    for name in AIMDO_LIBRARY_USERS:
        module = importlib.import_module(name)
        if module.lib is None:
            importlib.reload(module)


@contextmanager
def dynamic_vram():
    """DynamicVRAM's switches on for the block, every model unloaded before and after (none loaded in one mode
    may be reused in the other)."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    load_aimdo()
    saved = comfy.memory_management.aimdo_enabled, comfy.model_patcher.CoreModelPatcher
    comfy.model_management.unload_all_models()
    comfy.memory_management.aimdo_enabled = True
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    try:
        yield
    finally:
        comfy.memory_management.aimdo_enabled, comfy.model_patcher.CoreModelPatcher = saved
        comfy.model_management.unload_all_models()


def lazy_layers() -> bool:
    """True while comfy.ops layers are built without weights (the mode is really on)."""
    import comfy.ops
    return comfy.ops.disable_weight_init.Linear(2, 2).weight is None


def stored(state_dict: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def loaded_base_model(reference, dtype, compute_dtype=None):
    """A BaseModel of `reference`'s config built as ComfyUI builds one (weightless layers in this mode), then
    loaded from reference's weights saved in `dtype`: the model stores `dtype`, computes in `compute_dtype`
    (None: in `dtype`, as a GPU runs fp16/bf16 models; or ComfyUI's manual cast)."""
    config = type(reference.model_config)(dict(reference.model_config.unet_config))
    config.set_inference_dtype(dtype, compute_dtype)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(stored(reference.diffusion_model.state_dict(), dtype))
    return model


def dynamic_patcher(model, load_device=CUDA0):
    """The model in a ModelPatcherDynamic for a CUDA device object (never loaded: see the module docstring)."""
    import comfy.model_patcher
    patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=load_device,
                                                   offload_device=torch.device("cpu"))
    assert patcher.is_dynamic()
    return patcher

"""Node registry: every module in this folder contributes its NODE_CLASS_MAPPINGS.

Modules are found by listing the folder, so a new node file needs no edit here. A module that fails
to import is logged and skipped (as ComfyUI does for its own extras): the other nodes keep working.
"""
import importlib
import logging
import pkgutil

from ..linfusion_core.tiling.distributed_session import join_launcher
from .model_folder import register_model_folder

log = logging.getLogger("LinFusion")

register_model_folder()
# Only in a ComfyUI the launcher started (scripts/comfy_host.py serve --gpus N): join its process group and
# share rank 0's queue, before the server takes its first prompt. Elsewhere nothing happens.
join_launcher()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "model_folder":
        continue
    try:
        _module = importlib.import_module(f".{_info.name}", __name__)
    except Exception:
        log.exception("[LinFusion] could not import nodes/%s.py; its nodes are not available", _info.name)
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

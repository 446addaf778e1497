"""ComfyUI-LinFusion: LinFusion linear attention and high-resolution tools for ComfyUI.

ComfyUI's entry point only: it registers the nodes. The engine lives in linfusion_core/.
"""
import logging

try:
    import folder_paths  # noqa: F401  (present only inside a running ComfyUI)
except ImportError:
    # Imported outside ComfyUI (an IDE, a test collector, `python -c`): say so plainly, register nothing.
    logging.getLogger("LinFusion").warning(
        "[LinFusion] ComfyUI-LinFusion is a ComfyUI extension: put this folder into ComfyUI/custom_nodes "
        "and start ComfyUI. Outside ComfyUI it registers no nodes."
    )
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

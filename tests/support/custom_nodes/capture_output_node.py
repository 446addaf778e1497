"""A test-only output node: it keeps whatever reaches it so tests can read tensors a graph produced."""
import sys

CAPTURED: dict = {}
# ComfyUI imports this file under its path name; tests import it as `capture_output_node`.
sys.modules.setdefault("capture_output_node", sys.modules[__name__])


class CaptureOutput:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, value, unique_id):
        CAPTURED[str(unique_id)] = value
        return {}


NODE_CLASS_MAPPINGS = {"LinFusionTest_Capture": CaptureOutput}

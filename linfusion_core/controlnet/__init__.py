"""ControlNets with LinFusion: the released ControlNet modules put in place (controlnet_patch.py) and modules
distilled for a ControlNet the release does not cover (controlnet_distill.py)."""

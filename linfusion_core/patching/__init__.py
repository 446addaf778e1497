"""Putting LinFusion into a ComfyUI model: which attn1 sites exist (block_map.py), which module goes where
(placement.py), the removable model patch (patch.py), and the paper's low-memory tricks on top (low_memory.py)."""

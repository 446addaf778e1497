"""LinFusion's self-attention: the reference math (reference.py, the block loop every other path is checked
against), the fast path beside it (fast_path.py: weights folded once, the fewest launches), the module that picks
between them (module.py), and where softmax is faster on this device (auto_min_tokens.py)."""

"""The LinFusion engine, torch-first and testable without a UI; it never imports nodes/. Grouped by concept,
every import pointing down: controlnet/ and highres/ use patching/ and tiling/, which use attention/ and
weights/; progress.py and dynamic_vram.py are shared by all."""

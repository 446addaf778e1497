"""The LinFusion engine: attention math, checkpoint loading, block mapping, model patching,
high-resolution schedules and tiled VAE. Torch-first and testable without a UI; it never imports nodes/."""

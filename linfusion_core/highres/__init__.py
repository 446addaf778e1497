"""High-resolution generation: the paper's progressive ladder (progressive_upscale.py) and its schedule, the
DEIS sampler and skip-residual sampler, DemoFusion's refinements, the latent/pixel crossing (vae_codec.py,
pixel_upscale.py) and SDXL's size conditioning."""

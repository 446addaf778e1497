"""Exact tiling: the tiled UNet (tiled_unet.py, its model patch tiled_unet_patch.py, and the seam that splits one
image over ranks, tiled_unet_distributed.py), the tiled VAE (tiled_vae.py, tiled_vae_passes.py), and what both
share: whole-map GroupNorm statistics, the tile grid, the VAE's attention."""

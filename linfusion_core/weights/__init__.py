"""The released LinFusion files: reading and checking a checkpoint (checkpoint.py) and fetching the releases
from the model hub (hub_download.py)."""

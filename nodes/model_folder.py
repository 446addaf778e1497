"""The `models/linfusion/` folder, registered with ComfyUI so extra_model_paths.yaml can add more."""
import os

import folder_paths

FOLDER_NAME = "linfusion"
# Folders (hub layout: config.json + diffusion_pytorch_model.safetensors) are listed as well as files.
EXTENSIONS = {".safetensors", ".sft"}


def register_model_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    if FOLDER_NAME in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER_NAME]
        if default not in paths:
            paths.insert(0, default)
        exts.update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER_NAME] = ([default], set(EXTENSIONS))
    os.makedirs(default, exist_ok=True)

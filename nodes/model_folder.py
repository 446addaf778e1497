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


HUB_WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_CONFIG = "config.json"


def list_linfusion_entries() -> list[str]:
    """Files and hub folders (config.json + weights) under every registered linfusion path.

    A hub folder is listed once, by its folder name; its inner weights file is not listed separately."""
    hub_folders = set()
    for root in folder_paths.get_folder_paths(FOLDER_NAME):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if HUB_WEIGHTS in files and HUB_CONFIG in files and dirpath != root:
                hub_folders.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    files = [f for f in folder_paths.get_filename_list(FOLDER_NAME)
             if not (f.endswith("/" + HUB_WEIGHTS) and f[: -len(HUB_WEIGHTS) - 1] in hub_folders)]
    return sorted(hub_folders) + sorted(files)


def resolve_linfusion_entry(name: str) -> str:
    """The path of a listed file or hub folder; raises naming the entry when it is gone."""
    for root in folder_paths.get_folder_paths(FOLDER_NAME):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate) and os.path.isfile(os.path.join(candidate, HUB_WEIGHTS)):
            return candidate
    path = folder_paths.get_full_path(FOLDER_NAME, name)
    if path is None:
        raise FileNotFoundError(f"[LinFusion] '{name}' is not in models/{FOLDER_NAME} (searched: "
                                f"{', '.join(folder_paths.get_folder_paths(FOLDER_NAME))})")
    return path

"""The `models/linfusion/` folder, registered with ComfyUI so extra_model_paths.yaml can add more, and the
released sets that are fetched into it on demand (when a prompt runs, never at start)."""
import os

import comfy.model_management
import comfy.utils
import folder_paths

from ..linfusion_core.weights.checkpoint import LinFusionLoadError
from ..linfusion_core.weights.hub_download import RELEASES, download_release, release_name, repo_id

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
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]   # staging folders of running downloads
            if HUB_WEIGHTS in files and HUB_CONFIG in files and dirpath != root:
                hub_folders.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    files = [f for f in folder_paths.get_filename_list(FOLDER_NAME)
             if not (f.endswith("/" + HUB_WEIGHTS) and f[: -len(HUB_WEIGHTS) - 1] in hub_folders)
             and not any(part.startswith(".") for part in f.replace(os.sep, "/").split("/"))]
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


def list_linfusion_choices() -> list[str]:
    """What the loaders offer: everything on disk, then each released set not among it, by its plain name (it
    is downloaded when a prompt uses it). Always listing the plain names keeps the value a shipped or saved
    workflow holds in the list, before and after the download. Values saved with the old " (download)" mark
    are not listed but still validate and load (validate_linfusion_choice, linfusion_path)."""
    entries = list_linfusion_entries()
    return entries + [name for name in RELEASES if name not in entries]


def release_not_on_disk(name: str) -> bool:
    """A released set with no folder of its name under any linfusion path: a prompt using it downloads it."""
    return release_name(name) is not None and _folder(release_name(name)) is None


def validate_linfusion_choice(name: str):
    """True, or why not. Released names are valid with and without the mark, on disk or not, so a saved
    workflow stays valid before and after the download (ComfyUI would check against the list otherwise)."""
    if release_name(name) is not None or name in list_linfusion_entries():
        return True
    return f"'{name}' is not in models/{FOLDER_NAME} and is not a released LinFusion set ({', '.join(RELEASES)})"


def linfusion_path(name: str) -> str:
    """The path of a listed entry; a released set that is not on disk is downloaded first, with a progress
    bar on the running node and ComfyUI's cancel honoured."""
    release = release_name(name)
    if release is None:
        return resolve_linfusion_entry(name)
    folder = _folder(release)
    if folder is not None:   # never re-downloaded or overwritten, even when incomplete
        if not os.path.isfile(os.path.join(folder, HUB_WEIGHTS)):
            raise LinFusionLoadError(f"[LinFusion] the folder {folder} has no {HUB_WEIGHTS}; it is not overwritten: "
                                     f"add the file from {repo_id(release)}, or delete the folder to download it again")
        return folder
    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    root = folder_paths.get_folder_paths(FOLDER_NAME)[0]
    return download_release(release, root, progress=progress,
                            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)


def _folder(name: str):
    """An existing folder of that name under any registered linfusion path."""
    for root in folder_paths.get_folder_paths(FOLDER_NAME):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None

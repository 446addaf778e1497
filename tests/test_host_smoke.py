"""The extension is loaded by ComfyUI's own custom-node loader, not imported around it."""
import sys


def test_loaded_by_comfyui_loader(host):
    import nodes

    assert "ComfyUI-LinFusion" in nodes.LOADED_MODULE_DIRS
    module = host.extension_module
    # The loader registers the package under its path, with this checkout behind the link.
    assert module.__name__ == host.extension_path
    assert module.__name__ in sys.modules
    assert module.NODE_CLASS_MAPPINGS, "the extension registered no nodes"
    for name, cls in module.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[name] is cls


def test_linfusion_model_folder_registered(host):
    import folder_paths

    paths = folder_paths.get_folder_paths("linfusion")
    assert any(p.endswith("models/linfusion") for p in paths)

"""SD 1.x vs SD 2.x LinFusion weights through ComfyUI's executor, on the fixture checkpoints and files.

A renamed file without config cannot show which of the two it is for (identical tensors; see
linfusion_core/weights/checkpoint.py AMBIGUOUS_FAMILY): it runs with the model's heads, and both nodes' `info`
outputs and a WARNING say the family was assumed. The same weights with a config (hub folder or metadata)
stop with the wrong-family error."""
import logging

import pytest


def prompt(fixtures, ckpt_family, linfusion_name):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint[ckpt_family]}},
        "lf": {"class_type": "LinFusionLoader", "inputs": {"linfusion_name": linfusion_name}},
        "apply": {"class_type": "ApplyLinFusion", "inputs": {"model": ["ckpt", 0], "linfusion": ["lf", 0],
                                                             "blocks": "all", "min_tokens": 0}},
        "load_info": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["lf", 1]}},
        "apply_info": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["apply", 1]}},
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd21"])
def test_fixture_bare_file_says_the_family_was_assumed(host, fixtures, caplog, family):
    """Even on its own family: without a config nothing was checked, and the user is told so. (Tests are
    ordered so consecutive prompts share a checkpoint, which ComfyUI's cache then keeps loaded.)"""
    name = fixtures.linfusion_bare[family]
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        captured = host.run(prompt(fixtures, family, name)).captured
    assert "ASSUMED" in captured["load_info"] and "SD1.x or SD2.x" in captured["load_info"]
    expected = {"sd15": "SD1.x", "sd21": "SD2.x"}[family]
    assert f"family ASSUMED from the model: '{name}'" in captured["apply_info"]
    assert f"applied as {expected} weights" in captured["apply_info"]
    assert any(r.levelno == logging.WARNING and "ASSUMED" in r.getMessage() and name in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("weights,model", [("sd15", "sd21"), ("sd21", "sd15")])
def test_fixture_bare_file_on_the_other_family(host, fixtures, weights, model):
    """The fixture checkpoints of the two families have different layouts (7 and 22 self-attention modules),
    so here the module count stops the wrong file. The released SD 1.5 and 2.1 files both have 16 modules of
    the same widths: that case (accepted, with the warning) is test_checkpoint_loading's
    test_bare_file_on_the_other_family_says_the_family_was_assumed, on two same-layout models."""
    name = fixtures.linfusion_bare[weights]
    err = host.run(prompt(fixtures, model, name), expect_error=True)
    message = str(err)
    assert name in message and "module counts differ" in message
    assert {"sd15": "the model is SD1.x", "sd21": "the model is SD2.x"}[model] in message


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["linfusion_folder", "linfusion_single"])
def test_fixture_files_with_config_stop_on_the_other_family(host, fixtures, layout):
    name = getattr(fixtures, layout)["sd21"]
    err = host.run(prompt(fixtures, "sd15", name), expect_error=True)
    message = str(err)
    assert name in message and "weights for SD2.x" in message and "the model is SD1.x" in message

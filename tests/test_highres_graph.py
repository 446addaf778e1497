"""The high-res nodes in a real graph through ComfyUI's executor, on the SD 1.5 fixture checkpoint."""
import pytest
import torch


def base_graph(fixtures):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures.checkpoint["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }


@pytest.mark.slow
def test_low_memory_ladder_graph(host, fixtures):
    prompt = base_graph(fixtures)
    prompt.update({
        "6": {"class_type": "LinFusionLowMemory", "inputs": {
            "model": ["1", 0], "sequential_cond": True, "ff_chunk_tokens": 1024, "inplace_silu": True,
            "park_skips": True, "attention_chunk_tokens": 0}},
        "7": {"class_type": "LinFusionProgressiveUpscale", "inputs": {
            "model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "latent": ["5", 0],
            "seed": 1, "stages": 1, "target_width": 0, "target_height": 0, "ladder": "sdxl", "strengths": "",
            "base_steps": 6, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "upscale_in": "pixels",
            "demofusion": True, "anchoring": True, "vae_tile_size": 0, "return_stage_images": True}},
        "8": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["7", 0]}},
        "9": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["7", 1]}},
    })
    result = host.run(prompt)
    latent = result.captured["8"]["samples"]
    assert latent.shape == (1, 4, 12, 16)
    assert torch.isfinite(latent).all()
    # A list output: ComfyUI runs the capture node once per image; the last one is the final stage's.
    assert tuple(result.captured["9"].shape) == (1, 96, 128, 3)
    ladder_progress = [(v, t) for node, v, t in result.progress if node == "7"]
    # One bar, 100 ticks a unit: ceil(6 * 0.32) = 2 steps + decode, encode and the kept final decode.
    assert ladder_progress and ladder_progress[-1] == (500, 500)
    assert {t for _, t in ladder_progress} == {500}


@pytest.mark.slow
def test_demofusion_patch_in_a_ksampler_graph(host, fixtures):
    prompt = base_graph(fixtures)
    prompt.update({
        "6": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0], "upscale_method": "bicubic",
                                                          "scale_by": 2.0}},
        "7": {"class_type": "LinFusionDemoFusion", "inputs": {
            "model": ["1", 0], "reference": ["6", 0], "dilation_ratio": 2, "seed": 0, "skip_residual": True,
            "blur_sigma": 0.8, "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0],
            "seed": 0, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5}},
        "9": {"class_type": "LinFusionMatchLatentStats", "inputs": {"latent": ["8", 0], "reference": ["5", 0]}},
        "10": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["9", 0]}},
        "11": {"class_type": "LinFusionTest_Capture", "inputs": {"value": ["5", 0]}},
    })
    result = host.run(prompt)
    out, base = result.captured["10"]["samples"], result.captured["11"]["samples"]
    assert out.shape == (1, 4, 12, 16)
    assert torch.allclose(out.mean(dim=(2, 3)), base.mean(dim=(2, 3)), atol=1e-4)

"""Stage arithmetic and the pure latent filters of the high-res recipes (LINFUSION_FACTS.md section 4)."""
import importlib
import math

import pytest
import torch


@pytest.fixture(scope="module")
def hs(core):
    return importlib.import_module(core.__name__ + ".highres.highres_schedule")


@pytest.fixture(scope="module")
def lf(core):
    return importlib.import_module(core.__name__ + ".highres.latent_filters")


def sizes(stages):
    return [(s.width, s.height) for s in stages]


def test_sd15_16k_ladder_matches_the_paper(hs):
    stages = hs.plan_stages(1024, 512, num_stages=4, ladder="sd15")
    assert sizes(stages) == [(2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]
    assert [s.strength for s in stages] == [0.4, 0.3, 0.2, 0.1]
    assert [s.steps for s in stages] == [20, 15, 10, 5]
    assert [s.ratio for s in stages] == [2, 4, 8, 16]
    # The same ladder asked for by its target size.
    assert hs.plan_stages(1024, 512, target=(16384, 8192), ladder="sd15") == stages


def test_sdxl_16k_ladder_matches_the_paper(hs):
    stages = hs.plan_stages(1024, 1024, num_stages=4, ladder="sdxl")
    assert sizes(stages) == [(2048, 2048), (4096, 4096), (8192, 8192), (16384, 16384)]
    assert [s.strength for s in stages] == pytest.approx([0.32, 0.24, 0.16, 0.08], abs=1e-12)
    assert [s.steps for s in stages] == [16, 12, 8, 4]
    # linspace(0.32, 0, S + 1)[s - 1], for other stage counts too.
    for n in (1, 2, 3, 5):
        expected = torch.linspace(0.32, 0, n + 1, dtype=torch.float64)[:n].tolist()
        assert hs.sdxl_strengths(n) == pytest.approx(expected, abs=1e-12)


def test_steps_are_robust_to_float_noise(hs):
    assert math.ceil(50 * 0.14) == 8  # the trap: 50 * 0.14 is 7.000000000000001
    assert hs.steps_for_strength(50, 0.14) == 7
    assert hs.steps_for_strength(100, 0.28) == 28
    assert hs.steps_for_strength(50, 0.31) == 16
    assert hs.steps_for_strength(10, 0.01) == 1
    with pytest.raises(ValueError, match="strength"):
        hs.steps_for_strength(50, 1.5)


@pytest.mark.parametrize("base", [(776, 1160), (1016, 520), (1344, 768), (520, 3000)])
def test_odd_aspect_ratios_stay_on_the_grid(hs, base):
    for grid in (8, 64):
        stages = hs.plan_stages(*base, num_stages=3, ladder="sdxl", grid=grid)
        for s in stages:
            assert s.width % grid == 0 and s.height % grid == 0
            # x2 per stage, within one grid cell of the exact size: the aspect ratio is kept.
            assert abs(s.width - base[0] * 2 ** s.index) <= grid / 2
            assert abs(s.height - base[1] * 2 ** s.index) <= grid / 2


def test_target_size_with_a_short_last_stage(hs):
    stages = hs.plan_stages(1024, 576, target=(3000, 1690), ladder="sdxl")
    assert sizes(stages) == [(2048, 1152), (3000, 1688)]  # the last stage lands on the target, grid-snapped
    assert [s.ratio for s in stages] == [2, 3]
    assert hs.stages_for_target(512, 512, 4096, 4096) == 3
    assert hs.stages_for_target(512, 512, 4097, 4096) == 4
    with pytest.raises(ValueError, match="not larger"):
        hs.plan_stages(1024, 1024, target=(512, 512))


def test_bad_ladders_are_refused_with_a_clear_error(hs):
    with pytest.raises(ValueError, match="give the strengths explicitly"):
        hs.plan_stages(512, 512, num_stages=5, ladder="sd15")
    with pytest.raises(ValueError, match="3 strengths given for 2 stages"):
        hs.plan_stages(512, 512, num_stages=2, strengths=[0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match="exactly one"):
        hs.plan_stages(512, 512)
    with pytest.raises(ValueError, match="comma-separated"):
        hs.parse_strengths("0.4, abc")
    assert hs.parse_strengths(" 0.4, 0.25 ") == [0.4, 0.25]
    assert hs.parse_strengths("") is None
    # Each recipe's own step rule: the SD 1.5 img2img pipeline truncates (int(7.5) = 7), the SDXL pipelines ceil.
    stages = hs.plan_stages(512, 512, num_stages=2, strengths=[0.5, 0.25], base_steps=30, ladder="sd15")
    assert [s.steps for s in stages] == [15, 7]
    stages = hs.plan_stages(512, 512, num_stages=2, strengths=[0.5, 0.25], base_steps=30, ladder="sdxl")
    assert [s.steps for s in stages] == [15, 8]
    assert hs.steps_for_strength(10, 0.01, hs.STEPS_INT) == 1   # never 0 steps


def test_cosine_factor_and_weights(hs):
    assert hs.cosine_factor(1000) == pytest.approx(1.0)
    assert hs.cosine_factor(0) == pytest.approx(0.0)
    assert hs.cosine_factor(500) == pytest.approx(0.5)
    t = torch.tensor([0.0, 250.0, 999.0])
    assert torch.allclose(hs.cosine_factor(t), torch.tensor([hs.cosine_factor(v) for v in t.tolist()]))
    c1, c2, c3 = hs.mixing_weights(250.0)
    c = hs.cosine_factor(250.0)
    assert (c1, c2, c3) == pytest.approx((c ** 3, c, c))
    assert hs.blur_sigma(1.0, 0.8) == pytest.approx(0.8)
    assert hs.blur_sigma(0.0, 1.0) == pytest.approx(0.01)
    assert [hs.blur_kernel_size(r) for r in (1, 2, 4, 16)] == [1, 3, 7, 31]
    assert hs.super_resolution_ratio(3000, 2000) == 3


def test_gaussian_blur_matches_its_definition(lf):
    k = lf.gaussian_kernel_1d(7, 1.3)
    r = torch.arange(7.0) - 3
    assert torch.allclose(k, torch.exp(-r ** 2 / (2 * 1.3 ** 2)) / torch.exp(-r ** 2 / (2 * 1.3 ** 2)).sum())
    # A delta in the interior spreads into the outer product of the 1D kernel.
    x = torch.zeros(1, 2, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = lf.gaussian_blur(x, 7, 1.3)
    assert torch.allclose(y[0, 1, 4:11, 4:11], torch.outer(k, k), atol=1e-6)
    # Constants stay constant (the borders are reflected, not zero-padded), even where too small to reflect.
    assert torch.allclose(lf.gaussian_blur(torch.full((1, 4, 9, 11), 0.7), 7, 2.0), torch.tensor(0.7))
    assert torch.allclose(lf.gaussian_blur(torch.full((1, 4, 2, 3), 0.7), 7, 2.0), torch.tensor(0.7))
    assert lf.gaussian_blur(x, 1, 1.0) is x
    with pytest.raises(ValueError, match="odd"):
        lf.gaussian_kernel_1d(4, 1.0)


def test_blur_restandardised_keeps_channel_statistics(lf):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 48, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.3
    y = lf.blur_restandardised(x, 7, 1.0)
    mx, sx = lf.channel_stats(x)
    my, sy = lf.channel_stats(y)
    assert torch.allclose(mx, my, atol=1e-5) and torch.allclose(sx, sy, atol=1e-5)
    # ... while it really is smoother: less energy in neighbour differences.
    assert (y.diff(dim=-1) ** 2).mean() < 0.5 * (x.diff(dim=-1) ** 2).mean()
    # fp16 in, fp16 out, statistics kept to fp16 accuracy.
    y16 = lf.blur_restandardised(x.half(), 7, 1.0)
    assert y16.dtype == torch.float16 and torch.allclose(y16.float(), y, atol=1e-2)


def test_match_stats_anchors_to_a_reference(lf):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, 4, 8, 8, generator=g) * 2 + 1
    x = torch.randn(1, 4, 64, 64, generator=g) * 0.5 - 3
    y = lf.match_stats(x, *lf.channel_stats(ref))
    for a, b in zip(lf.channel_stats(y), lf.channel_stats(ref)):
        assert torch.allclose(a, b, atol=1e-5)
    # Shape of the content is untouched: a per-channel affine map.
    assert torch.corrcoef(torch.stack([x[0, 0].flatten(), y[0, 0].flatten()]))[0, 1] > 0.9999

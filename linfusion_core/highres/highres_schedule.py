"""Stage arithmetic of the paper's high-resolution recipes (LINFUSION_FACTS.md section 4).

Pure functions of numbers: which sizes, strengths and step counts a progressive (x2 per stage) upscale
runs, and the cosine weights DemoFusion-style refinement mixes with. No torch model, no ComfyUI.
Sizes are (width, height) in pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Section 4A: the SD 1.5 "SDEdit" 16K ladder.
SD15_STRENGTHS = (0.4, 0.3, 0.2, 0.1)
# Section 4B: SDXL, strength for stage s = linspace(SDXL_MAX_STRENGTH, 0, S + 1)[s - 1].
SDXL_MAX_STRENGTH = 0.32
PAPER_BASE_STEPS = 50
# Section 4B defaults: cosine scales for the skip residual, the dilated-branch blend and the blur sigma.
COSINE_SCALES = (3.0, 1.0, 1.0)
LATENT_GRID = 8  # pixels per latent cell of the SD VAEs

# How a stage's step count follows from its strength: the SD 1.5 img2img pipeline truncates,
# init_timestep = int(steps * strength); the paper's SDXL pipelines round up, ceil(steps * strength).
STEPS_INT = "int"
STEPS_CEIL = "ceil"

# The ladder's recipe choices (widget values of LinFusion Progressive Upscale).
FOLLOW_LADDER = "paper (follows ladder)"
ANCHOR_AUTO = FOLLOW_LADDER
ANCHOR_BASE = "every stage to the base (paper high-res)"
ANCHOR_INPUT = "every stage to its input (paper super-res)"
ANCHOR_OFF = "off"
ANCHORINGS = (ANCHOR_AUTO, ANCHOR_BASE, ANCHOR_INPUT, ANCHOR_OFF)
# The SD 1.5 notebook's sampler and grid: diffusers' DEISMultistepScheduler of Lykon/dreamshaper-8 on its "leading"
# grid (deis_sampler.py); the SDXL pipelines' Euler on the leading grid is ComfyUI's euler + ddim_uniform.
SAMPLER_AUTO = FOLLOW_LADDER
SCHEDULER_AUTO = FOLLOW_LADDER
DEIS_SAMPLER = "deis_diffusers (paper sd15)"
LEADING_SCHEDULER = "leading_diffusers (paper sd15)"
# What the paper uses as negative conditioning (no negative prompt is given anywhere): the SD 1.5 pipeline encodes
# the empty string; the SDXL pipelines (force_zeros_for_empty_prompt) use all-zero embeddings and pooled vector.
NEGATIVE_EMPTY_PROMPT = "empty prompt"
NEGATIVE_ZEROS = "zeros"


@dataclass(frozen=True)
class Recipe:
    """One of the paper's high-resolution recipes (LINFUSION_FACTS.md section 4): what its official code runs.
    The single table the ladder node's defaults, the example workflows and their test read."""
    name: str
    ladder: str                     # the ladder node's `ladder` value
    sampler: str                    # the ladder's sampler_name / scheduler values that are the official grid
    scheduler: str
    base_steps: int
    cfg: float
    max_strength: float | None      # the sdxl ladder's linspace(max_strength, 0, S + 1); None for sd15
    steps_rule: str                 # STEPS_INT or STEPS_CEIL
    anchoring: str                  # resolved: ANCHOR_BASE / ANCHOR_INPUT / ANCHOR_OFF
    size_conditioning: str | None   # SDXL only (sdxl_size values); None for SD 1.5
    demofusion: bool
    negative: str                   # NEGATIVE_EMPTY_PROMPT or NEGATIVE_ZEROS
    source: str

    def stage_strengths(self, num_stages: int) -> list[float]:
        return ladder_strengths(self.ladder, num_stages, self.max_strength or SDXL_MAX_STRENGTH)


def _recipes():
    from .sdxl_size import SIZE_FINAL, SIZE_STAGE

    return {
        "sd15": Recipe("sd15", "sd15", DEIS_SAMPLER, LEADING_SCHEDULER, PAPER_BASE_STEPS, 7.5, None,
                       STEPS_INT, ANCHOR_OFF, None, False, NEGATIVE_EMPTY_PROMPT,
                       "examples/inference/ultra_text2image_w_sdedit.ipynb (Lykon/dreamshaper-8, its DEIS scheduler)"),
        "sdxl": Recipe("sdxl", "sdxl", "euler", "ddim_uniform", PAPER_BASE_STEPS, 7.5, SDXL_MAX_STRENGTH,
                       STEPS_CEIL, ANCHOR_BASE, SIZE_FINAL, True, NEGATIVE_ZEROS,
                       "src/pipelines/pipeline_highres_sdxl.py (Euler, leading spacing)"),
        "sdxl_superres": Recipe("sdxl_superres", "sdxl", "euler", "ddim_uniform", PAPER_BASE_STEPS, 7.5,
                                SDXL_MAX_STRENGTH, STEPS_CEIL, ANCHOR_INPUT, SIZE_STAGE, True, NEGATIVE_ZEROS,
                                "src/pipelines/pipeline_superres_sdxl.py (Euler, leading spacing)"),
    }


RECIPES = _recipes()
# The recipe a `ladder` value stands for (the super-resolution recipe is the sdxl ladder with its own choices).
LADDER_RECIPES = {"sd15": RECIPES["sd15"], "sdxl": RECIPES["sdxl"]}


@dataclass(frozen=True)
class Stage:
    index: int        # 1-based stage number (stage 0 is the base image)
    width: int        # pixels
    height: int
    strength: float   # img2img denoise of this stage
    steps: int        # sampler steps actually run: int or ceil(base_steps * strength), the recipe's rule
    ratio: int        # integer scale of this stage over the base (the DemoFusion dilation factor)


def steps_for_strength(base_steps: int, strength: float, rule: str = STEPS_CEIL) -> int:
    """ceil (SDXL pipelines) or int (SD 1.5 img2img) of base_steps * strength, robust to float noise (50 * 0.14 is
    7.000000000000001 in floats); at least 1 (where the paper's int would run no step at all)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if rule not in (STEPS_CEIL, STEPS_INT):
        raise ValueError(f"steps rule must be {STEPS_CEIL!r} or {STEPS_INT!r}, got {rule!r}")
    exact = round(base_steps * strength, 9)
    return max(1, math.ceil(exact) if rule == STEPS_CEIL else math.floor(exact))


def snap_to_grid(pixels: float, grid: int = LATENT_GRID) -> int:
    """Nearest multiple of the latent grid (at least one cell)."""
    return max(grid, int(round(pixels / grid)) * grid)


def sdxl_strengths(num_stages: int, max_strength: float = SDXL_MAX_STRENGTH) -> list[float]:
    """linspace(max_strength, 0, S + 1)[:S]: the paper's SDXL ladder (0.32/0.24/0.16/0.08 for S = 4)."""
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    return [max_strength * (1.0 - s / num_stages) for s in range(num_stages)]


def sd15_strengths(num_stages: int) -> list[float]:
    """The paper's SD 1.5 ladder, 0.4/0.3/0.2/0.1, truncated to the stages asked for."""
    if not 1 <= num_stages <= len(SD15_STRENGTHS):
        raise ValueError(f"the paper's SD 1.5 ladder has {len(SD15_STRENGTHS)} stages; for {num_stages} stages "
                         "give the strengths explicitly (or use the 'sdxl' linspace ladder)")
    return list(SD15_STRENGTHS[:num_stages])


def ladder_strengths(ladder: str, num_stages: int, max_strength: float = SDXL_MAX_STRENGTH) -> list[float]:
    """The strengths a ladder gives its stages: "sd15" (0.4/0.3/0.2/0.1) or "sdxl" (linspace(max_strength, 0))."""
    if ladder == "sd15":
        return sd15_strengths(num_stages)
    if ladder == "sdxl":
        return sdxl_strengths(num_stages, max_strength)
    raise ValueError(f"unknown ladder {ladder!r}: expected 'sd15' or 'sdxl'")


def stages_for_target(base_w: int, base_h: int, target_w: int, target_h: int) -> int:
    """How many x2 stages reach a target size from the base (the last stage may scale by less than 2)."""
    scale = max(target_w / base_w, target_h / base_h)
    if scale <= 1.0:
        raise ValueError(f"target {target_w}x{target_h} is not larger than the base {base_w}x{base_h}")
    return max(1, math.ceil(math.log2(scale) - 1e-9))


def plan_stages(base_w: int, base_h: int, *, num_stages: int | None = None,
                target: tuple[int, int] | None = None, ladder: str = "sd15",
                strengths: Sequence[float] | None = None, base_steps: int = PAPER_BASE_STEPS,
                max_strength: float = SDXL_MAX_STRENGTH, grid: int = LATENT_GRID) -> list[Stage]:
    """The stages of a progressive upscale from a base image of base_w x base_h pixels.

    Give either num_stages (each stage doubles both sides) or target (width, height): then the stages double
    until the last, which lands on the target snapped to the grid. The aspect ratio of the base is kept on the
    doubling stages; a target with another aspect ratio is reached at the last stage. Strengths come from
    `strengths` if given, else from the ladder: "sd15" (0.4/0.3/0.2/0.1) or "sdxl" (linspace(max_strength, 0)).
    Steps per stage follow the ladder's recipe: int(base_steps * strength) for sd15, ceil for sdxl.
    """
    if (num_stages is None) == (target is None):
        raise ValueError("give exactly one of num_stages or target")
    if base_w < grid or base_h < grid:
        raise ValueError(f"base size {base_w}x{base_h} is smaller than one latent cell ({grid} px)")
    if target is not None:
        num_stages = stages_for_target(base_w, base_h, *target)
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if strengths is not None:
        strengths = [float(s) for s in strengths]
        if len(strengths) != num_stages:
            raise ValueError(f"{len(strengths)} strengths given for {num_stages} stages")
    else:
        strengths = ladder_strengths(ladder, num_stages, max_strength)
    if ladder not in LADDER_RECIPES:
        raise ValueError(f"unknown ladder {ladder!r}: expected 'sd15' or 'sdxl'")
    rule = LADDER_RECIPES[ladder].steps_rule

    stages = []
    for s in range(1, num_stages + 1):
        if target is not None and s == num_stages:
            w, h = snap_to_grid(target[0], grid), snap_to_grid(target[1], grid)
        else:
            w, h = snap_to_grid(base_w * 2 ** s, grid), snap_to_grid(base_h * 2 ** s, grid)
        ratio = max(1, round(max(w / base_w, h / base_h)))
        stages.append(Stage(s, w, h, strengths[s - 1], steps_for_strength(base_steps, strengths[s - 1], rule), ratio))
    return stages


def parse_strengths(text: str) -> list[float] | None:
    """"0.4, 0.3, 0.2" -> [0.4, 0.3, 0.2]; an empty string means "use the ladder's defaults"."""
    text = text.strip()
    if not text:
        return None
    try:
        return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"strengths must be comma-separated numbers like '0.4, 0.3, 0.2', got {text!r}") from None


def super_resolution_ratio(width: int, height: int, base_long_side: int = 1024) -> int:
    """Section 4C: dilation ratio for one-stage super-resolution, ceil(max(W, H) / base long side)."""
    return max(1, math.ceil(max(width, height) / base_long_side))


def cosine_factor(t):
    """c(t) = 0.5 * (1 + cos(pi * (1000 - t) / 1000)): 1 at the noisiest timestep, 0 at t = 0.

    t is the model timestep in [0, 1000) (a float or a tensor)."""
    if hasattr(t, "cos"):  # a tensor: keep it on its device and in fp32
        return 0.5 * (1.0 + (math.pi * (1000.0 - t.float()) / 1000.0).cos())
    return 0.5 * (1.0 + math.cos(math.pi * (1000.0 - t) / 1000.0))


def mixing_weights(t, cosine_scales: Sequence[float] = COSINE_SCALES):
    """(skip-residual weight c^s1, dilated-branch weight c^s2, blur weight c^s3) at timestep t."""
    c = cosine_factor(t)
    return tuple(c ** s for s in cosine_scales)


def blur_sigma(c3, sigma: float = 0.8):
    """Gaussian sigma of the dilated branch's blur: sigma * (0.99 * c3 + 0.01) (sigma 0.8..1.0 in the paper)."""
    return sigma * (0.99 * c3 + 0.01)


def blur_kernel_size(ratio: int) -> int:
    """Kernel 2r - 1 for dilation ratio r (1 means no blur)."""
    return max(1, 2 * int(ratio) - 1)

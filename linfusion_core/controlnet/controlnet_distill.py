"""LinFusion modules distilled for one ControlNet: each of its self-attention layers gets a LinFusion module
(initialised from the base model's matching module) fitted to reproduce that layer's own softmax attention.

The paper distils per layer by feature matching: the student sees the teacher layer's input and is trained
to give the teacher layer's output. The teacher here is the ControlNet itself, run at its native resolution
on random unit-variance latents (what a ControlNet sees after ComfyUI's input scaling), the user's hint image
and prompt, at a few noise levels. The fitted modules are saved as a LinFusion file (config in its metadata)
named after the ControlNet and a hash of its weights, and loaded instead of re-fitted next time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass

import torch

from ..weights.checkpoint import METADATA_KEY, LinFusionLoadError, LinFusionWeights, ModuleSpec, load_linfusion
from .controlnet_patch import SOURCE_DISTILLED, apply_linfusion_controlnet, control_family, place_control_modules
from ..attention.module import LinFusionAttention

log = logging.getLogger("LinFusion")

NATIVE_SIZE = {"SD1.x": 512, "SD2.x": 768, "SDXL": 1024}     # px, the long side the ControlNet was trained at
DEFAULT_TIMESTEPS = (999.0, 749.0, 499.0, 249.0)               # the noise levels captured
DEFAULT_SAMPLES = 8      # random latents captured, spread over the noise levels (more data: less over-fitting)
DEFAULT_STEPS = 100
DEFAULT_LR = 3e-3
INFO_KEY = "linfusion_controlnet"     # metadata of a distilled file: what it was fitted from
SUBFOLDER = "controlnet_distilled"    # under models/linfusion/


# ------------------------------------------------------------------------------------ identity

_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def controlnet_digest(control_model) -> str:
    """sha256 of the ControlNet's weights (names, dtypes, shapes, bytes): the CONTROL_NET object does not
    know its file name, its weights say which ControlNet it is. Cached per model object."""
    if control_model in _DIGESTS:
        return _DIGESTS[control_model]
    h = hashlib.sha256()
    with torch.inference_mode():
        for key, tensor in sorted(control_model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _DIGESTS[control_model] = h.hexdigest()
    return _DIGESTS[control_model]


def distilled_path(folder: str, name: str, digest: str) -> str:
    stem = os.path.splitext(os.path.basename(name or ""))[0]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "controlnet"
    return os.path.join(folder, f"{safe}-{digest[:12]}.safetensors")


# ------------------------------------------------------------------------------------ teacher activations

@dataclass
class LayerData:
    """One attn1's input (its normed tokens) and its softmax output, B x N x C in the ControlNet's dtype."""
    x: torch.Tensor
    y: torch.Tensor


def _context_dim(control_model, placements) -> int:
    import comfy.utils
    attn2 = comfy.utils.get_attr(control_model, placements[0].site.comfy_path[: -len("attn1")] + "attn2")
    return attn2.to_k.in_features


def teacher_inputs(control_net, placements, hint_image: torch.Tensor, conditioning=None, size: int | None = None,
                   timesteps=DEFAULT_TIMESTEPS, seed: int = 0, device=None, samples: int = DEFAULT_SAMPLES) -> dict:
    """The ControlNet's call arguments at native size: `samples` random latents spread over the timesteps, the
    hint resized as ComfyUI's get_control resizes it, the prompt (or a fixed random one) and for SDXL the size
    conditioning."""
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    control_model = control_net.control_model
    family = control_family(control_model, [p.site for p in placements])
    size = size or NATIVE_SIZE.get(family, 512)
    if hint_image is None:
        raise LinFusionLoadError("distilling LinFusion for a ControlNet needs its hint image: connect the image you "
                                 "give Apply ControlNet")
    hh, hw = hint_image.shape[1], hint_image.shape[2]
    scale = size / max(hh, hw)                       # native long side, the hint's aspect
    h, w = max(1, round(hh * scale / 8)), max(1, round(hw * scale / 8))
    b = samples
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    hint = comfy.utils.common_upscale(hint_image[:1].movedim(-1, 1), w * 8, h * 8, control_net.upscale_algorithm,
                                      "center")
    hint = control_net.preprocess_image(hint).repeat(b, 1, 1, 1)
    dim = _context_dim(control_model, placements)
    if conditioning:
        context = conditioning[0][0][:1]
        if context.shape[-1] != dim:
            raise LinFusionLoadError(f"the conditioning has {context.shape[-1]} channels; this ControlNet expects "
                                     f"{dim} ({family}): connect a prompt encoded by the matching model")
        pooled = conditioning[0][1].get("pooled_output")
    else:   # a fixed stand-in prompt: the seed varies the latents only
        context, pooled = torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(0)), None
    out = {"x": x, "hint": hint, "timesteps": torch.tensor([timesteps[i % len(timesteps)] for i in range(b)]),
           "context": context.repeat(b, 1, 1)}
    if getattr(control_model, "num_classes", None) is not None:
        adm = control_model.label_emb[0][0].in_features
        if adm == 2816:   # SDXL: pooled text (1280) + six 256-wide size embeddings, as encode_adm builds it
            pooled = pooled[:1] if pooled is not None else torch.randn(1, 1280, generator=g)
            sizes = torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=torch.float32)
            y = torch.cat([pooled.float(), timestep_embedding(sizes, 256).reshape(1, -1)], dim=1)
        else:
            y = torch.randn(1, adm, generator=g)
        out["y"] = y.repeat(b, 1)
    dtype = control_net.manual_cast_dtype or control_model.dtype
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}


@torch.no_grad()
def capture_layers(control_model, placements, inputs: dict) -> list[LayerData]:
    """Run the ControlNet once (softmax attention) and keep every patched attn1's input and output."""
    import comfy.utils

    store: list[list] = [[] for _ in placements]
    handles = []

    def hook_for(i):
        def hook(module, args, output):
            store[i] = [args[0].detach().clone(), output.detach().clone()]
        return hook

    try:
        for i, p in enumerate(placements):
            handles.append(comfy.utils.get_attr(control_model, p.site.comfy_path).register_forward_hook(hook_for(i)))
        control_model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p.site.comfy_path for p, s in zip(placements, store) if not s]
    if missing:
        raise RuntimeError(f"these ControlNet self-attention layers did not run: {missing}")
    return [LayerData(*s) for s in store]


# ------------------------------------------------------------------------------------ fitting

def relative_error(out: torch.Tensor, target: torch.Tensor) -> float:
    return ((out.float() - target.float()).norm() / target.float().norm()).item()


def student(weights: LinFusionWeights, placement, device) -> LinFusionAttention:
    """A trainable fp32 copy of the base module for this layer."""
    spec, site = placement.spec, placement.site
    module = LinFusionAttention(site.dim, site.heads, spec.projection_mid_dim, dtype=torch.float32, device=device)
    module.load_state_dict({k: v.float() for k, v in weights.module_state_dict(spec.index).items()}, strict=True)
    return module


def fit_layer(module: LinFusionAttention, data: LayerData, steps: int, lr: float = DEFAULT_LR, on_step=None) -> float:
    """Adam on the relative squared error to the softmax output (cosine-decayed lr); returns the final loss."""
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    scale = data.y.pow(2).mean().clamp_min(1e-12)
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss = (module(data.x) - data.y).pow(2).mean() / scale
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if on_step is not None:
            on_step()
    module.requires_grad_(False)
    return loss_value


def distill(control_net, base: LinFusionWeights, hint_image, conditioning=None, steps: int = DEFAULT_STEPS,
            size: int | None = None, timesteps=DEFAULT_TIMESTEPS, seed: int = 0, lr: float = DEFAULT_LR,
            device=None, progress: bool = True, samples: int = DEFAULT_SAMPLES) -> tuple[LinFusionWeights, list[dict]]:
    """Fit one LinFusion module per ControlNet self-attention; returns the weights (names and heads of the
    ControlNet's layers) and a per-layer report (error of the base module and of the fitted one, on the
    captured activations)."""
    import comfy.model_management
    import comfy.utils

    control_model = control_net.control_model
    placements = place_control_modules(base, control_model)
    if device is None:
        comfy.model_management.load_models_gpu([control_net.control_model_wrapped])
        device = control_net.control_model_wrapped.load_device
    bar = comfy.utils.ProgressBar(1 + steps * len(placements)) if progress else None

    def tick():
        comfy.model_management.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update(1)

    # ComfyUI runs nodes under inference_mode: training needs autograd, and tensors made here must be normal.
    with torch.inference_mode(False):
        inputs = teacher_inputs(control_net, placements, hint_image, conditioning, size, timesteps, seed, device,
                                samples)
        layers = capture_layers(control_model, placements, inputs)
        tick()
        specs, state, report = [], {}, []
        with torch.enable_grad():
            for i, placement in enumerate(placements):
                data, layers[i] = layers[i], None
                data = LayerData(data.x.float(), data.y.float())   # one layer in fp32 at a time, freed as we go
                module = student(base, placement, device)
                with torch.no_grad():
                    before = relative_error(module(data.x), data.y)
                fit_layer(module, data, steps, lr, on_step=tick)
                with torch.no_grad():
                    after = relative_error(module(data.x), data.y)
                site, spec = placement.site, placement.spec
                report.append({"layer": site.diffusers_name, "tokens": data.x.shape[1], "base": before,
                               "distilled": after})
                specs.append(ModuleSpec(i, site.dim, spec.projection_mid_dim, site.heads, site.diffusers_name))
                dtype = base.module_state_dict(spec.index)["to_q.weight"].dtype
                state.update({f"{i}.{k}": v.detach().to("cpu", dtype).contiguous()
                              for k, v in module.state_dict().items()})
                del module, data
    return LinFusionWeights(base.source, specs, state, "distilled"), report


# ------------------------------------------------------------------------------------ file

def save_distilled(weights: LinFusionWeights, path: str, info: dict) -> None:
    from safetensors.torch import save_file

    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0",
              "modules_list": [{"dim_n": m.dim, "heads": m.heads, "module_name": m.name,
                                "projection_mid_dim": None if m.projection_mid_dim == m.dim else m.projection_mid_dim}
                               for m in weights.modules]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    save_file(weights.state_dict, tmp, metadata={METADATA_KEY: json.dumps(config), INFO_KEY: json.dumps(info)})
    os.replace(tmp, path)


def read_info(path: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get(INFO_KEY, "{}"))
    except Exception:
        return {}


def distilled_for_controlnet(control_net, base: LinFusionWeights, hint_image, folder: str, name: str = "",
                             conditioning=None, steps: int = DEFAULT_STEPS, **fit_kwargs):
    """The distilled weights for this ControlNet: loaded from `folder` when a file fitted from the same
    ControlNet weights, base LinFusion file and step count exists, fitted and saved otherwise.
    Returns (weights, summary)."""
    digest = controlnet_digest(control_net.control_model)
    path = distilled_path(folder, name, digest)
    base_name = os.path.basename(base.source.rstrip("/"))
    wanted = {"controlnet_sha256": digest, "base": base_name, "steps": int(steps)}
    if os.path.isfile(path):
        info = read_info(path)
        if {k: info.get(k) for k in wanted} == wanted:
            weights = load_linfusion(path)
            return weights, f"loaded {os.path.basename(path)} (distilled earlier, {steps} steps)"
        log.info("[LinFusion] %s was fitted with other settings (%s); fitting again", path,
                 {k: info.get(k) for k in wanted})
    weights, report = distill(control_net, base, hint_image, conditioning, steps, **fit_kwargs)
    mean = lambda key: sum(r[key] for r in report) / len(report)  # noqa: E731
    info = {**wanted, "layers": report}
    save_distilled(weights, path, info)
    weights.source = path
    summary = (f"distilled {len(report)} modules in {steps} steps, saved {os.path.basename(path)}; mean relative "
               f"error against the ControlNet's softmax attention {mean('base'):.3f} (base modules) -> "
               f"{mean('distilled'):.3f}")
    log.info("[LinFusion] %s", summary)
    return weights, summary


def linfusion_controlnet(control_net, base: LinFusionWeights, source: str, steps: int = DEFAULT_STEPS,
                         hint_image=None, conditioning=None, name: str = "", folder: str | None = None):
    """What the LinFusion ControlNet node does: (patched copy, info) with the chosen source of modules."""
    import comfy.controlnet

    weights, note = base, ""
    if source == SOURCE_DISTILLED:
        if isinstance(control_net, (comfy.controlnet.ControlLora, comfy.controlnet.T2IAdapter)):
            note = (f"; '{source}' needs a full ControlNet (a ControlLoRA borrows the UNet's attention weights, a "
                    f"T2I-Adapter has none), so nothing was distilled")
        else:
            if folder is None:
                raise ValueError("distilling needs a folder to save the result in")
            weights, summary = distilled_for_controlnet(control_net, base, hint_image, folder, name, conditioning,
                                                        steps)
            note = "; " + summary
    patched, info = apply_linfusion_controlnet(control_net, weights, source)
    return patched, info + note

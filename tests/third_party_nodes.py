"""The ComfyUI_IPAdapter_plus node types example workflow 5 uses: declared as the pack defines them, and a
stand-in that patches the model the way the pack does, for tests where the pack itself cannot be installed.

Declared from cubiq/ComfyUI_IPAdapter_plus, IPAdapterPlus.py (registry id `comfyui_ipadapter_plus`):
NODE_CLASS_MAPPINGS "IPAdapterUnifiedLoader" (IPAdapterUnifiedLoader) and "IPAdapter" (IPAdapterSimple).
The mechanism copied in the stand-in (CrossAttentionPatch.py, `set_model_patch_replace`): an object with the
signature `(q, k, v, extra_options)` in `transformer_options["patches_replace"]["attn2"]` under the keys
("input", i) for i in 1,2,4,5,7,8, ("output", i) for i in 3..11 and ("middle", 1) on SD 1.5; it runs
`optimized_attention(q, k, v)` and adds `weight * optimized_attention(q, ip_k, ip_v)` of the image tokens.
"""
from __future__ import annotations

import contextlib

import torch

PACK_MODULE = "custom_nodes.ComfyUI_IPAdapter_plus"
PACK_REGISTRY_ID = "comfyui_ipadapter_plus"
PRESETS = ['LIGHT - SD1.5 only (low strength)', 'STANDARD (medium strength)', 'VIT-G (medium strength)',
           'PLUS (high strength)', 'PLUS FACE (portraits)', 'FULL FACE - SD1.5 only (portraits stronger)']
SIMPLE_WEIGHT_TYPES = ['standard', 'prompt is more important', 'style transfer']
SD15_ATTN2_KEYS = ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)]
                   + [("middle", 1)])


class IPAdapterUnifiedLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "preset": (PRESETS,)},
                "optional": {"ipadapter": ("IPADAPTER",)}}

    RETURN_TYPES = ("MODEL", "IPADAPTER")
    RETURN_NAMES = ("model", "ipadapter")
    FUNCTION = "load_models"
    CATEGORY = "ipadapter"

    def load_models(self, model, preset, ipadapter=None):
        # Stand-in for the CLIP-vision + IP-Adapter weights: 4 image tokens of the SD 1.5 context width and
        # seeded K/V projections per patched block (to_k_ip / to_v_ip in the pack).
        gen = torch.Generator().manual_seed(PRESETS.index(preset))
        return (model, {"tokens": torch.randn(1, 4, 768, generator=gen), "seed": PRESETS.index(preset)})


class IPAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "ipadapter": ("IPADAPTER",), "image": ("IMAGE",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 3, "step": 0.05}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "weight_type": (SIMPLE_WEIGHT_TYPES,)},
            "optional": {"attn_mask": ("MASK",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight, start_at, end_at, weight_type, attn_mask=None):
        model = model.clone()
        sampling = model.get_model_object("model_sampling")
        # The image steers the tokens, as its CLIP-vision embedding does in the pack.
        tokens = ipadapter["tokens"] * (1.0 + image.float().mean())
        patch = Attn2Replace(tokens, weight, sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at),
                             ipadapter["seed"])
        to = model.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        for key in SD15_ATTN2_KEYS:
            to["patches_replace"]["attn2"][key] = patch
        model.model_options["transformer_options"] = to
        return (model,)


class Attn2Replace:
    """The pack's cross-attention replacement: the normal attention plus the image tokens' attention."""
    calls: list = []   # (block, transformer_index, cond_or_uncond) of every call, for the tests

    def __init__(self, tokens, weight, sigma_start, sigma_end, seed):
        self.tokens, self.weight, self.sigma_start, self.sigma_end = tokens, weight, sigma_start, sigma_end
        self.seed = seed
        self.kv = {}

    def _projections(self, inner_dim, dtype, device):
        if inner_dim not in self.kv:
            gen = torch.Generator().manual_seed(self.seed * 1000 + inner_dim)
            k = torch.randn(768, inner_dim, generator=gen) / 768 ** 0.5
            v = torch.randn(768, inner_dim, generator=gen) / 768 ** 0.5
            self.kv[inner_dim] = (k, v)
        return [t.to(device, dtype) for t in self.kv[inner_dim]]

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 1e9
        Attn2Replace.calls.append((extra_options["block"], extra_options["transformer_index"],
                                   tuple(extra_options["cond_or_uncond"])))
        if not (self.sigma_end <= sigma <= self.sigma_start) or self.weight == 0:
            return out
        to_k, to_v = self._projections(q.shape[-1], q.dtype, q.device)
        tokens = self.tokens.to(q.device, q.dtype).expand(q.shape[0], -1, -1)
        ip = optimized_attention(q, tokens @ to_k, tokens @ to_v, heads)
        return out + self.weight * ip


STAND_INS = {"IPAdapterUnifiedLoader": IPAdapterUnifiedLoader, "IPAdapter": IPAdapter}
DISPLAY_NAMES = {"IPAdapterUnifiedLoader": "IPAdapter Unified Loader", "IPAdapter": "IPAdapter"}


def _object_info(name, cls) -> dict:
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name, "display_name": DISPLAY_NAMES[name], "category": cls.CATEGORY,
            "python_module": PACK_MODULE, "cnr_id": PACK_REGISTRY_ID, "output_node": False}


DECLARED_THIRD_PARTY = {name: _object_info(name, cls) for name, cls in STAND_INS.items()}


@contextlib.contextmanager
def registered_stand_ins():
    """The stand-ins registered with the running ComfyUI for the duration (validation and execution)."""
    import nodes

    clash = set(STAND_INS) & set(nodes.NODE_CLASS_MAPPINGS)
    if clash:
        raise RuntimeError(f"the real pack seems installed ({sorted(clash)}): no stand-in needed")
    nodes.NODE_CLASS_MAPPINGS.update(STAND_INS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(DISPLAY_NAMES)
    Attn2Replace.calls = []
    try:
        yield Attn2Replace
    finally:
        for name in STAND_INS:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
            nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)

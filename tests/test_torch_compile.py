"""LinFusion under ComfyUI's TorchCompileModel node (torch.compile of the diffusion model, inductor, on the CPU):
no graph break anywhere in the model, and the compiled sampler gives the eager result.

SLOW BY DESIGN: inductor compiles a whole (one-level, 32-channel) UNet, one gcc run per fused kernel group,
about 30-50 s on 2 shared CPU cores; one compile per host. Issue #29: before, every LinFusion attn1 split the
graph in five (an out= into a strided view, which Dynamo does not trace).
"""
import torch

from linfusion_models import build_patcher, linfusion_for, sample


def torch_compile_model(model):
    """The MODEL output of ComfyUI's own TorchCompileModel node, backend inductor (what the node does: clone,
    then a torch.compile wrapper around the whole diffusion_model)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    out = TorchCompileModel.execute(model, "inductor")
    return (out.result if hasattr(out, "result") else out)[0]


def test_torch_compile_model_has_no_graph_break_and_matches_eager(core, monkeypatch):
    import comfy.ldm.modules.attention as attention
    import torch._dynamo
    from torch._dynamo.utils import counters

    # The model's own softmax attention (attn2 here) as on a GPU: PyTorch SDPA. ComfyUI's CPU default, the
    # sub-quadratic attention, asks psutil for free memory inside the model: a graph break of ComfyUI's own.
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)

    base = build_patcher("sd15_tiny", seed=5)
    patched, _ = core.patching.patch.apply_linfusion(base, linfusion_for(core, base.model, seed=6))
    with torch.inference_mode():
        eager = sample(patched, steps=1)
        plain = sample(base, steps=1)
    compiled_model = torch_compile_model(patched)

    torch._dynamo.reset()
    counters.clear()
    fast_calls = []
    fast_forward = core.attention.fast_path.fast_forward
    core.attention.fast_path.fast_forward = lambda *a, **kw: fast_calls.append(1) or fast_forward(*a, **kw)
    try:
        with torch.inference_mode():
            compiled = sample(compiled_model, steps=1)
    finally:
        core.attention.fast_path.fast_forward = fast_forward
        torch._dynamo.reset()
    breaks = dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert breaks == {}, f"graph breaks: {breaks}"
    assert counters["stats"]["unique_graphs"] == 1            # the whole diffusion model is one graph
    assert fast_calls, "LinFusion's fast path was not traced into the compiled model"
    scale = eager.abs().max().item()
    assert (compiled - eager).abs().max().item() <= 1e-4 * scale
    assert (eager - plain).abs().max().item() > 1e-2 * scale   # LinFusion acted in what was compared

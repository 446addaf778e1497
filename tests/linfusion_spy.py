"""A spy on LinFusion's attention for tests: what every call of a LinFusionAttention module received.

It wraps the class's forward (the module still runs), so it sees LinFusion wherever ComfyUI installed it,
through the executor too. A test can then say which levels LinFusion saw (token counts), how often each
module ran, and what HyperTile or Deep Shrink handed it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class AttentionCall:
    module: int                # id() of the LinFusionAttention that ran
    x: torch.Tensor            # a copy of its queries' input, B x N x C
    kv_shape: tuple            # shape of the tokens keys/values came from (x itself for plain self-attention)

    @property
    def tokens(self) -> int:
        return self.x.shape[1]


class LinFusionSpy:
    def __init__(self, core):
        self.cls = core.attention.module.LinFusionAttention
        self.calls: list[AttentionCall] = []

    def __enter__(self):
        original = self.original = self.cls.forward
        calls = self.calls

        def forward(module, x, context=None, value=None, **kwargs):
            calls.append(AttentionCall(id(module), x.detach().clone(), tuple((x if context is None else context).shape)))
            return original(module, x, context=context, value=value, **kwargs)

        self.cls.forward = forward
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.original
        return False

    def token_counts(self) -> set[int]:
        return {c.tokens for c in self.calls}

    def calls_per_module(self) -> Counter:
        return Counter(c.module for c in self.calls)

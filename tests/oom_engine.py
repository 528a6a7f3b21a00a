"""A test engine: the real tiny klein engine, except that requests above a budget raise torch's
own out-of-memory error, as a full card would. Shared by the OOM handling and benchmark tests."""

from __future__ import annotations

import torch

from handlers.engines.klein import KleinEngine


class OomAboveEngine(KleinEngine):
    """The real tiny engine, except that more than ``max_refs`` references or ``max_pixels``
    output pixels raise torch's own out-of-memory error, as a full card would."""

    def __init__(self, inner: KleinEngine, *, max_refs: int = 99, max_pixels: int = 1 << 40) -> None:
        super().__init__(
            pipeline=inner.pipeline,
            name=inner.name,
            device=inner.device,
            text_encoder_out_layers=inner.text_encoder_out_layers,
            max_sequence_length=inner.max_sequence_length,
        )
        self.max_refs, self.max_pixels = max_refs, max_pixels
        self.calls: list[tuple[int, int]] = []
        self.frees = 0

    def generate(self, **kw):
        self.calls.append((len(kw["references"]), kw["width"] * kw["height"]))
        if len(kw["references"]) > self.max_refs or kw["width"] * kw["height"] > self.max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(**kw)

    def free_memory(self) -> None:
        self.frees += 1
        super().free_memory()

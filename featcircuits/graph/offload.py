"""Offloading while attribution rows are computed: weights the gradients no longer need go to the CPU.

With the linear engine the gradients need only the clean run and what was taken from the weights before
the rows start (the attention value / output maps, norm weights, the decoder layout); the rest of the
HookedTransformer's parameters (embeddings, MLPs, unembedding) and the dictionaries' (whose encoder columns
are gathered per batch from wherever they are) can leave the accelerator for that time, as circuit-tracer's
``offload="cpu"`` does. The tensors are moved in place (``param.data``), so module configs and references
are untouched, and moved back when the block ends, also on error. (The attention maps the engine holds keep
their device copy alive meanwhile: they are a small part of a model.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..patching.replacement import ReplacementModel

__all__ = ["offloaded", "OFFLOAD_CHOICES"]

OFFLOAD_CHOICES = (None, "cpu")


@contextmanager
def offloaded(rm: ReplacementModel, where: str | None) -> Iterator[int]:
    """Within the block the model's and dictionaries' parameters and buffers live on ``where`` (``"cpu"``),
    or stay put for ``None``; yields the bytes moved off the accelerator (0 when nothing moved)."""
    if where not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be None or 'cpu', got {where!r}.")
    moved: list[tuple[torch.Tensor, torch.device]] = []
    if where is not None:
        target = torch.device(where)
        modules = [rm.model, *rm.dictionaries]
        seen: set[int] = set()
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) in seen or tensor.device == target:
                    continue
                seen.add(id(tensor))
                moved.append((tensor, tensor.device))
                tensor.data = tensor.data.to(target)
    try:
        yield sum(tensor.numel() * tensor.element_size() for tensor, _ in moved)
    finally:
        for tensor, device in moved:
            tensor.data = tensor.data.to(device)

"""Where activation rows come from: a model's forward pass over token sequences.

A source yields chunks ``{hook: [rows, d_hook]}`` (rows aligned across hooks, so paired transcoder
inputs and outputs stay paired) and has a ``state_dict`` with its data position, so a resumed run
continues exactly where the checkpoint stopped.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["ModelSource", "hook_layer"]


def hook_layer(hook: str) -> int | None:
    """Block index of ``blocks.L....`` hooks; None for hooks outside the blocks (embed, ln_final)."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


class ModelSource:
    """Runs ``model`` over ``tokens`` ``[n_seq, ctx]`` and captures every hook in one forward.

    Sequences are visited in a seeded random order, a new one per epoch; with several data-parallel
    ranks each rank takes every ``world_size``-th sequence. Positions holding special tokens (BOS, pad,
    ...) are dropped: their activations are outliers no dictionary should spend capacity on.
    """

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        hooks: list[str],
        model_batch_size: int,
        special_ids: list[int],
        drop_special: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        from ..models import check_hook_name

        for hook in hooks:
            check_hook_name(model, hook)
        self.model = model
        self.tokens = tokens
        self.hooks = list(dict.fromkeys(hooks))
        self.model_batch_size = model_batch_size
        self.special = torch.tensor(special_ids if drop_special else [], dtype=torch.long)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        layers = [hook_layer(hook) for hook in self.hooks]
        # Stop the forward after the last block we read: later layers cost time and change nothing.
        self.stop_at_layer = None if None in layers else max(layers) + 1  # type: ignore[type-var]
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()
        if len(self._order) == 0:
            raise ValueError(
                f"The dataset has {len(tokens)} sequences, too few for {world_size} data-parallel ranks."
            )

    def _epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            order = torch.randperm(len(self.tokens), generator=generator)
        else:  # in file order: the disk cache records how far it got as a sequence count
            order = torch.arange(len(self.tokens))
        return order[self.rank :: self.world_size]

    def widths(self) -> dict[str, int]:
        chunk = self._forward(self.tokens[:1])
        return {hook: acts.shape[-1] for hook, acts in chunk.items()}

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def capture(acts: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = acts.detach()

        device = next(self.model.parameters()).device
        self.model.run_with_hooks(
            batch.to(device),
            fwd_hooks=[(hook, capture) for hook in self.hooks],
            stop_at_layer=self.stop_at_layer,
            return_type=None,
        )
        keep = ~torch.isin(batch, self.special).reshape(-1).to(device)
        out = {}
        for hook in self.hooks:
            acts = captured[hook]
            if acts.dim() == 4:  # per-head hooks [batch, pos, head, d_head] -> concatenated heads
                acts = acts.flatten(2)
            out[hook] = acts.reshape(-1, acts.shape[-1])[keep]
        return out

    def next_chunk(self) -> dict[str, torch.Tensor]:
        """One model forward: ``{hook: [rows, d_hook]}`` (rows = kept positions of the batch)."""
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        index = self._order[self.position : self.position + self.model_batch_size]
        self.position += len(index)
        return self._forward(self.tokens[index])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()

"""Where activation rows come from: a model's forward pass over token sequences.

A source yields chunks ``{hook: [rows, d_hook]}`` (rows aligned across hooks, so paired transcoder
inputs and outputs stay paired) and has a ``state_dict`` with its data position, so a resumed run
continues exactly where the checkpoint stopped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ModelSource", "StreamSource", "hook_layer", "fused_attention"]


def hook_layer(hook: str) -> int | None:
    """Block index of ``blocks.L....`` hooks; None for hooks outside the blocks (embed, ln_final)."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def _fused_attention_supported(model: Any, hooks: list[str]) -> bool:
    """Whether ``fused_attention`` reproduces ``model``'s attention: causal global attention over standard or
    rotary positions with nothing else in the scores (the patching forward's own test), plain output
    projection, and no requested hook inside the attention module (its pattern or per-head values)."""
    from ..patching.attention import own_blocks_supported

    cfg = model.cfg
    return (own_blocks_supported(model) and not cfg.use_attn_result and not cfg.use_split_qkv_input
            and not cfg.use_attn_in and not any(".attn." in hook for hook in hooks))


def _fused_forward(attn: Any, original: Any) -> Any:
    """``attn.forward`` with the scores, mask, softmax and mixing in one ``scaled_dot_product_attention``.

    transformer_lens materialises ``[batch, head, pos, pos]`` scores and passes over them five times (mask,
    softmax, NaN guard, pattern hook, mixing); on CPU at stories260k's shapes that is 70% of the model's
    forward. Anything this does not cover (a key-value cache, padding or additive masks, per-head inputs)
    goes to ``original``.
    """
    from ..patching.attention import rotate

    cfg = attn.cfg

    def forward(query_input: torch.Tensor, key_input: torch.Tensor, value_input: torch.Tensor,
                past_kv_cache_entry: Any = None, additive_attention_mask: Any = None,
                attention_mask: Any = None, position_bias: Any = None) -> torch.Tensor:
        if (past_kv_cache_entry is not None or additive_attention_mask is not None or position_bias is not None
                or query_input.dim() != 3 or (attention_mask is not None and not bool(attention_mask.all()))):
            return original(query_input, key_input, value_input, past_kv_cache_entry=past_kv_cache_entry,
                            additive_attention_mask=additive_attention_mask, attention_mask=attention_mask,
                            position_bias=position_bias)
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [batch, pos, head, d_head]
        if cfg.positional_embedding_type == "rotary":
            positions = torch.arange(q.shape[1], device=q.device)[:, None]
            q, k = attn.hook_rot_q(rotate(attn, q, positions)), attn.hook_rot_k(rotate(attn, k, positions))
        if k.shape[2] != q.shape[2]:  # grouped-query attention: query head h reads key/value head h // group
            group = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scale = 1.0 / float(attn.attn_scale) if cfg.use_attn_scale else 1.0
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).to(q.dtype),
                                           is_causal=True, scale=scale)  # [batch, head, pos, d_head]
        z = attn.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        W_O = attn.W_O.reshape(-1, attn.W_O.shape[-1])  # [head * d_head, d_model]
        return torch.addmm(attn.b_O, z.flatten(2).flatten(0, 1).to(W_O.dtype), W_O).view(*z.shape[:2], -1)

    return forward


@contextmanager
def fused_attention(model: Any, hooks: list[str]) -> Iterator[bool]:
    """Within the block, ``model``'s attention modules run fused (``_fused_forward``) where that gives the
    same activations at ``hooks``; yields whether it does."""
    if not _fused_attention_supported(model, hooks):
        yield False
        return
    patched = []
    for block in model.blocks:
        attn = block.attn
        patched.append((attn, attn.__dict__.get("forward")))
        attn.forward = _fused_forward(attn, attn.forward)
    try:
        yield True
    finally:
        for attn, before in patched:
            if before is None:
                del attn.forward
            else:
                attn.forward = before


class ModelSource:
    """Runs ``model`` over ``tokens`` ``[n_seq, ctx]`` and captures every hook in one forward.

    Sequences are visited in a seeded random order, a new one per epoch. Positions holding special tokens
    (BOS, pad, ...) are dropped: their activations are outliers no dictionary should spend capacity on.

    With ``world_size`` > 1 data-parallel ranks (all calling ``next_chunk`` together), each rank runs the
    forward of every ``world_size``-th sequence of the model batch and the activations are all-gathered
    back into batch order: every rank then holds exactly the chunk a single process would compute, for a
    ``1/world_size`` share of the model's work. Each rank's store serves the global batch and the trainer
    keeps this rank's slice, so a data-parallel run follows the single-process run step for step.
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
        self._setup(model, hooks, model_batch_size, special_ids, drop_special, rank, world_size)
        self.tokens = tokens
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()
        if len(self._order) == 0:
            raise ValueError("The dataset has no token sequences; give a longer text or a smaller context_size.")

    def _setup(self, model: Any, hooks: list[str], model_batch_size: int, special_ids: list[int],
               drop_special: bool, rank: int, world_size: int) -> None:
        from ..models import check_hook_name

        if model_batch_size < 1:
            raise ValueError(f"model_batch_size={model_batch_size} must be positive (sequences per model forward).")
        for hook in hooks:
            check_hook_name(model, hook)
        self.model = model
        self.hooks = list(dict.fromkeys(hooks))
        self.model_batch_size = model_batch_size
        self.special = torch.tensor(special_ids if drop_special else [], dtype=torch.long)
        self.rank, self.world_size = rank, world_size
        layers = [hook_layer(hook) for hook in self.hooks]
        # Stop the forward after the last block we read: later layers cost time and change nothing.
        self.stop_at_layer = None if None in layers else max(layers) + 1  # type: ignore[type-var]
        self._widths: dict[str, int] | None = None

    def _epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            return torch.randperm(len(self.tokens), generator=generator)
        return torch.arange(len(self.tokens))  # file order: the disk cache records its progress as a count

    def widths(self) -> dict[str, int]:
        return {hook: acts.shape[-1] for hook, acts in self._capture(torch.zeros(1, 1, dtype=torch.long)).items()}

    @torch.no_grad()
    def _capture(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward of ``batch [n_seq, pos]``: ``{hook: [n_seq, pos, d_hook]}`` (heads concatenated)."""
        captured: dict[str, torch.Tensor] = {}

        def capture(acts: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = acts.detach()

        device = next(self.model.parameters()).device
        with fused_attention(self.model, self.hooks):
            self.model.run_with_hooks(
                batch.to(device),
                fwd_hooks=[(hook, capture) for hook in self.hooks],
                stop_at_layer=self.stop_at_layer,
                return_type=None,
            )
        # per-head hooks [batch, pos, head, d_head] -> concatenated heads
        return {hook: acts.flatten(2) if acts.dim() == 4 else acts for hook, acts in captured.items()}

    def _capture_shared(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``_capture(batch)`` computed a ``1/world_size`` share per rank and all-gathered in batch order.

        Rank ``r`` runs sequences ``r, r + W, r + 2W, ...``; shares are zero-padded to one length so the
        gather has equal shapes (a rank whose share is empty runs no forward).
        """
        from . import distributed

        if self._widths is None:
            self._widths = self.widths()
        world = self.world_size
        per_rank = -(-len(batch) // world)
        mine = batch[self.rank :: world]
        captured = self._capture(mine) if len(mine) else {}
        device = next(self.model.parameters()).device
        out = {}
        for hook in self.hooks:
            # The model's dtype on every rank, also on one with nothing to run: the gather needs one dtype.
            share = torch.zeros(per_rank, batch.shape[1], self._widths[hook], device=device, dtype=self.model.cfg.dtype)
            if captured:
                share[: len(mine)] = captured[hook]
            gathered = distributed.all_gather_rows(share)  # [world * per_rank, pos, d], rank-major
            # Sequence j of the batch is row j // W of rank j % W: as [per_rank, world] the flat index is j.
            out[hook] = gathered.view(world, per_rank, *share.shape[1:]).transpose(0, 1).flatten(0, 1)[: len(batch)]
        return out

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{hook: [rows, d_hook]}``: the activations of ``batch [n_seq, pos]`` without special positions."""
        captured = self._capture_shared(batch) if self.world_size > 1 else self._capture(batch)
        device = next(iter(captured.values())).device
        keep = ~torch.isin(batch, self.special).reshape(-1).to(device)
        return {hook: acts.reshape(-1, acts.shape[-1])[keep] for hook, acts in captured.items()}

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


class StreamSource(ModelSource):
    """Runs ``model`` over rows streamed from a ``TokenRows`` in dataset order, ``model_batch_size`` at a time.

    Rows are read only as the store asks for them, so a run reads (and runs the model over) about the rows
    it trains on, whatever the dataset's size; the ``ActivationStore`` buffer shuffles their positions.
    ``state_dict`` is the row stream's, so a resumed run continues with the next row.

    Args:
        needed_tokens: the tokens the run trains on, for the message when the dataset is smaller.
        batch_size: rows per optimiser step; a dataset with fewer usable tokens than one batch is refused.
        max_rows: read at most this many rows, then ``next_chunk`` returns ``{}`` (the disk cache's stop);
            a non-repeating stream that ends also returns ``{}`` when ``stop_at_end``, else raises.
    """

    def __init__(self, model: Any, rows: Any, hooks: list[str], model_batch_size: int, special_ids: list[int],
                 drop_special: bool = True, rank: int = 0, world_size: int = 1, needed_tokens: int = 0,
                 batch_size: int = 1, max_rows: int | None = None, stop_at_end: bool = False) -> None:
        self._setup(model, hooks, model_batch_size, special_ids, drop_special, rank, world_size)
        self.rows, self.needed_tokens, self.batch_size = rows, needed_tokens, batch_size
        self.max_rows, self.stop_at_end = max_rows, stop_at_end
        self.tokens_per_row = rows.context_size - (1 if drop_special else 0)  # BOS opens every row
        self._reported = False

    @property
    def position(self) -> int:
        """Rows read so far (all epochs)."""
        return self.rows.rows_done

    @position.setter
    def position(self, rows: int) -> None:
        # The disk cache resumes by row count: skip (tokenize, no model) up to there.
        while self.rows.rows_done < rows and not self.rows.ended:
            self.rows.next_rows(min(4096, rows - self.rows.rows_done))

    def _available(self) -> str:
        rows = self.rows.first_epoch_rows
        return f"{rows * self.tokens_per_row} usable tokens ({rows} rows of context_size={self.rows.context_size})"

    def _report_epoch_size(self) -> None:
        """Once the first epoch ended: refuse a dataset too small for the run, or say how many epochs it takes."""
        from . import distributed

        self._reported = True
        rows = self.rows.first_epoch_rows
        usable = rows * self.tokens_per_row
        name = self.rows.source.name
        if usable < self.batch_size:
            raise ValueError(f"Dataset {name} gives {usable} usable tokens, fewer than one batch (batch_size="
                             f"{self.batch_size}); use more text or a smaller batch_size.")
        if self.stop_at_end or not self.needed_tokens or usable >= self.needed_tokens:
            return
        if not self.rows.repeat:
            raise ValueError(
                f"Dataset {name} ended after {self._available()}, but the run trains on {self.needed_tokens} tokens "
                "and repeat_dataset is off: lower --tokens (total_tokens), use more data, or set repeat_dataset=true."
            )
        if distributed.rank() == 0:
            print(f"featcircuits train: {self.needed_tokens} tokens from a dataset of {usable}: "
                  f"{math.ceil(self.needed_tokens / usable)} epochs over the same text.")

    def next_chunk(self) -> dict[str, torch.Tensor]:
        """One model forward over the next rows: ``{hook: [rows, d_hook]}``; ``{}`` once a cache's stream stops."""
        want = self.model_batch_size
        if self.max_rows is not None:
            want = min(want, self.max_rows - self.position)
            if want <= 0:
                return {}
        batch = self.rows.next_rows(want)
        if self.rows.first_epoch_rows is not None and not self._reported:
            self._report_epoch_size()
        if len(batch) == 0:
            if self.stop_at_end:
                return {}
            raise ValueError(f"Dataset {self.rows.source.name} ended after {self._available()}: the run asked for "
                             "more rows than it holds; set repeat_dataset=true or lower --tokens.")
        return self._forward(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.state_dict(), "reported": self._reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self._reported = bool(state["reported"])

"""The positions of each prompt that a batched edge-patching forward has to run.

Under patch ablation every sender's output equals its ablation at the positions before a prompt's first token
where the clean and corrupt prompts differ, so no edge removal changes anything there: each prompt's forward
is the clean run up to that token, and its keys and values there are the clean run's. After its last token
nothing is read. So each prompt runs one window, from its first differing token to its last token; windows
are left-aligned in a ``[n, width]`` grid (``width`` the longest window), a prompt's shorter window padded
with positions no real query sees. Other ablations change every position: the window is the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

__all__ = ["PromptWindows", "first_differences", "frozen_prefix_cache"]


def first_differences(clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor,
                      clean_last: torch.Tensor) -> torch.Tensor:
    """``[n]`` each prompt's first position where its clean and corrupt tokens ``[n, pos]`` differ, at most its
    last token ``clean_last [n]`` (which always runs). Before it, patch ablation changes nothing."""
    differs = clean_tokens != corrupt_tokens
    first = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), differs.shape[1])
    return torch.minimum(first, clean_last)


def frozen_prefix_cache(keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> TransformerLensKeyValueCache:
    """A frozen transformer_lens cache of per-layer ``(keys, values) [rows, prefix, heads, d_head]``: a
    forward given it runs only the positions after the prefix, which it leaves unchanged."""
    keys = keys_values[0][0]
    entries = [TransformerLensKeyValueCacheEntry(k, v, frozen=True) for k, v in keys_values]
    mask = torch.ones(keys.shape[0], keys.shape[1], dtype=torch.int, device=keys.device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


@dataclass
class PromptWindows:
    """Per-prompt windows of positions.

    Attributes:
        starts: ``[n]`` each window's first absolute position.
        last: ``[n]`` each prompt's last token, as an index into its window.
        positions: ``[n, width]`` the absolute position of each window slot (past a prompt's last token:
            later positions, clamped to the sequence, which no real query attends to).
        prefix: the clean keys and values kept before the windows: positions ``0 .. max(starts)``.
    """

    starts: torch.Tensor
    last: torch.Tensor
    positions: torch.Tensor
    prefix: int
    _masks: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor, clean_last: torch.Tensor,
           patch: bool) -> PromptWindows:
        """Windows for prompts ``[n, pos]`` with last tokens ``clean_last [n]``; ``patch``: patch ablation (else
        every window starts at 0)."""
        length = clean_tokens.shape[1]
        starts = (first_differences(clean_tokens, corrupt_tokens, clean_last) if patch
                  else torch.zeros_like(clean_last))
        last = clean_last - starts
        width = int(last.max()) + 1
        slots = torch.arange(width, device=starts.device)
        positions = (starts[:, None] + slots).clamp(max=length - 1)
        return cls(starts=starts, last=last, positions=positions, prefix=int(starts.max()))

    @property
    def width(self) -> int:
        return self.positions.shape[1]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x [n | 1, ..., pos, ...]`` (positions at ``dim``) -> ``[n, ..., width, ...]`` at the windows."""
        n = self.positions.shape[0]
        x = x.expand(n, *x.shape[1:])
        index = self.positions.view(n, *([1] * (dim - 1)), self.width, *([1] * (x.dim() - dim - 1)))
        out_shape = list(x.shape)
        out_shape[dim] = self.width
        return torch.gather(x, dim, index.expand(out_shape))

    def mask(self, last_only: bool = False) -> torch.Tensor:
        """Additive attention mask ``[n, query, prefix + width]`` over the clean prefix's keys then the window's:
        a prefix key is seen where it precedes the prompt's window, a window key by the queries at or after
        it. ``last_only``: one query per prompt, at its last token."""
        if last_only not in self._masks:
            self._masks[last_only] = self._build_mask(last_only)
        return self._masks[last_only]

    def _build_mask(self, last_only: bool) -> torch.Tensor:
        device = self.positions.device
        prefix_hidden = torch.arange(self.prefix, device=device) >= self.starts[:, None]  # [n, prefix]
        slots = torch.arange(self.width, device=device)
        if last_only:
            window_hidden = (slots > self.last[:, None]).unsqueeze(1)  # [n, 1, width]
        else:
            window_hidden = (slots > slots[:, None]).expand(len(self.starts), -1, -1)  # [n, width, width]
        queries = window_hidden.shape[1]
        hidden = torch.cat([prefix_hidden.unsqueeze(1).expand(-1, queries, -1), window_hidden], dim=2)
        return torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))

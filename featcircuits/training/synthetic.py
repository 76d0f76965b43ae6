"""Synthetic superposition: sparse features with known directions, the ground truth for dictionary learning.

``n_features`` unit directions live in ``d`` dimensions (``n_features > d``: superposition). Each row
activates each feature independently with probability ``p``, at a magnitude drawn from ``[0.5, 1.5]``;
the row is the sum of active features' directions times magnitudes. For transcoders the target is the
row passed through a known linear map ``M [d, d_out]``, so the true decoder directions are
``directions @ M`` (the true encoder directions stay ``directions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SuperpositionData", "SyntheticSource", "max_cosine_similarity"]


@dataclass
class SuperpositionData:
    """A generator of ``(x [rows, d], target [rows, d_out])`` batches with known feature directions."""

    n_features: int
    d: int
    p_active: float = 0.02
    d_out: int | None = None  # set for transcoder data: targets are x @ linear_map
    seed: int = 0

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_features, self.d, generator=generator)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)  # [n_features, d]
        self.linear_map = None
        if self.d_out is not None:
            # A well conditioned map (orthonormal rows, scaled 0.8-1.2 per output axis) keeps the mapped
            # directions as distinct as the originals, so recovering them is as well posed as for an SAE.
            if self.d_out < self.d:
                raise ValueError(f"d_out={self.d_out} < d={self.d}: the map would merge features; use d_out >= d.")
            basis, _ = torch.linalg.qr(torch.randn(self.d_out, self.d, generator=generator))  # [d_out, d]
            scales = 0.8 + 0.4 * torch.rand(self.d_out, generator=generator)
            self.linear_map = basis.T * scales  # [d, d_out]
        self.generator = torch.Generator().manual_seed(self.seed + 1)

    @property
    def output_directions(self) -> torch.Tensor:
        """``[n_features, d_out]`` unit directions the targets are built from."""
        if self.linear_map is None:
            return self.directions
        mapped = self.directions @ self.linear_map
        return mapped / mapped.norm(dim=-1, keepdim=True)

    def sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [rows, d], target [rows, d_out])``; ``target`` is ``x`` for SAE data."""
        active = torch.rand(rows, self.n_features, generator=self.generator) < self.p_active
        magnitudes = 0.5 + torch.rand(rows, self.n_features, generator=self.generator)
        coefficients = active * magnitudes  # [rows, n_features]
        x = coefficients @ self.directions
        target = x if self.linear_map is None else x @ self.linear_map
        return x, target

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class SyntheticSource:
    """An ``ActivationSource`` over ``SuperpositionData`` under hook names ``hook_in`` / ``hook_out``."""

    def __init__(self, data: SuperpositionData, hook_in: str = "x", hook_out: str = "x", rows: int = 4096) -> None:
        self.data, self.hook_in, self.hook_out, self.rows = data, hook_in, hook_out, rows

    def widths(self) -> dict[str, int]:
        return {self.hook_in: self.data.d, self.hook_out: self.data.d_out or self.data.d}

    def next_chunk(self) -> dict[str, torch.Tensor]:
        x, target = self.data.sample(self.rows)
        return {self.hook_in: x, self.hook_out: target}

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)


@torch.no_grad()
def max_cosine_similarity(true_directions: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each true direction ``[n, d]``, the best cosine similarity with any learned one ``[m, d]`` -> ``[n]``."""
    true_unit = true_directions / true_directions.norm(dim=-1, keepdim=True)
    learned_unit = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (true_unit @ learned_unit.T).max(dim=-1).values

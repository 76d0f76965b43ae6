"""Attribution targets: what the graph explains (logits, or a direction such as answer minus distractor).

A target is an affine read-out of the unembedding's input ``final [pos, d_model]`` (after the final
norm, whose scale is frozen): ``value = final[pos] @ vector + bias``. A logit target uses the *demeaned*
unembedding column (logit minus the mean logit), as circuit-tracer does, so constant shifts of every
logit carry no attribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Target", "logit_target", "logit_diff_target", "salient_logit_targets", "check_token"]


@dataclass
class Target:
    """``name`` labels the node (a token id for logits); ``weight`` scores its importance in pruning.

    ``vector [d_model]``, ``bias`` (scalar), ``pos`` (token position; negative counts from the end).
    """

    name: str
    vector: torch.Tensor
    bias: float
    pos: int = -1
    weight: float = 1.0
    is_logit: bool = False
    token: int | None = None


def check_token(model, token: int, what: str = "target token") -> int:
    d_vocab = model.cfg.d_vocab
    if not isinstance(token, int) and not (torch.is_tensor(token) and token.numel() == 1):
        raise ValueError(f"The {what} must be a token id (int), got {token!r}.")
    token = int(token)
    if not 0 <= token < d_vocab:
        raise ValueError(f"The {what} {token} is outside the vocabulary [0, {d_vocab}); give a valid token id.")
    return token


def _unembed(model) -> tuple[torch.Tensor, torch.Tensor]:
    W_U = model.unembed.W_U.detach()  # [d_model, d_vocab]
    b_U = model.unembed.b_U.detach() if getattr(model.unembed, "b_U", None) is not None else torch.zeros(
        W_U.shape[1], device=W_U.device, dtype=W_U.dtype
    )
    return W_U, b_U


def logit_target(model, token: int, weight: float = 1.0, pos: int = -1) -> Target:
    """The demeaned logit of ``token`` at ``pos``."""
    token = check_token(model, token)
    W_U, b_U = _unembed(model)
    vector = W_U[:, token] - W_U.mean(dim=1)
    bias = float(b_U[token] - b_U.mean())
    return Target(str(token), vector, bias, pos=pos, weight=weight, is_logit=True, token=token)


def logit_diff_target(model, answer: int, distractor: int, pos: int = -1, name: str | None = None) -> Target:
    """``logit[answer] - logit[distractor]`` at ``pos`` (a contrastive task's metric)."""
    answer = check_token(model, answer, "answer token")
    distractor = check_token(model, distractor, "distractor token")
    W_U, b_U = _unembed(model)
    return Target(
        name or f"{answer}-{distractor}", W_U[:, answer] - W_U[:, distractor],
        float(b_U[answer] - b_U[distractor]), pos=pos, weight=1.0,
    )


def salient_logit_targets(
    model, last_logits: torch.Tensor, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> list[Target]:
    """The most probable next tokens, until their cumulative probability reaches ``desired_logit_prob``
    (at most ``max_n_logits``), each weighted by its probability. ``last_logits [d_vocab]``."""
    if max_n_logits < 1:
        raise ValueError(f"max_n_logits must be at least 1, got {max_n_logits}.")
    probs = torch.softmax(last_logits.detach().float(), dim=-1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.numel()))
    n_keep = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, device=top_p.device))) + 1
    return [logit_target(model, int(t), weight=float(p)) for t, p in zip(top_idx[:n_keep], top_p[:n_keep], strict=True)]


def resolve_targets(model, last_logits: torch.Tensor, targets: Sequence[int] | Sequence[Target] | None,
                    max_n_logits: int, desired_logit_prob: float) -> list[Target]:
    """Targets from a ``build_graph`` argument: None (salient logits), token ids, or Target objects."""
    if targets is None:
        return salient_logit_targets(model, last_logits, max_n_logits, desired_logit_prob)
    if len(targets) == 0:
        raise ValueError("targets is empty; give token ids, Target objects, or None for the top logits.")
    probs = torch.softmax(last_logits.detach().float(), dim=-1)
    resolved = []
    for target in targets:
        if isinstance(target, Target):
            resolved.append(target)
        else:
            token = check_token(model, target)
            resolved.append(logit_target(model, token, weight=float(probs[token])))
    return resolved

"""Interventions by node id: set, scale or ablate features, error terms, heads and MLPs, then read the logits
or generate.

``intervene(model, prompt, {node_id: spec})`` runs the live replacement model (dictionaries spliced in, each
site's error term kept, so the unpatched run is the model itself) with the named units changed; features
downstream are recomputed from their changed inputs. A spec is a number (set the feature's activation to
it), ``"ablate"`` (0 for a feature, no error term for an error node, a head's or MLP's output zeroed), or a
scale: ``"*2"`` / ``"x0.5"`` / :class:`Scale`. Node ids are :mod:`featcircuits.nodes` ids: ``mlp2:113@5``
acts at position 5, ``mlp2:113`` at every position (and, in :func:`generate`, at every new one, as
circuit-tracer's ``feature_intervention_generate`` clamps features); ``L3.H2`` / ``L3.MLP`` act on a plain
HookedTransformer's components.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..nodes import Node, parse_node_id
from ..patching.edge_hooks import FwdHooks
from ..patching.replacement import ReplacementModel

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Scale", "InterventionResult", "GenerationResult", "intervene", "generate", "parse_spec"]


@dataclass(frozen=True)
class Scale:
    """Multiply the unit's value by ``factor``."""

    factor: float


Spec = float | int | str | Scale


def parse_spec(node_id: str, spec: Spec) -> float | Scale:
    """A spec as a value to set (``float``; "ablate" is 0) or a :class:`Scale`; errors name the node."""
    if isinstance(spec, Scale):
        value, scale = spec.factor, True
    elif isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError(f"Intervention on {node_id!r}: {spec!r} is not a number, 'ablate' or a scale such as '*2'.")
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("ablate", "off", "zero"):
            return 0.0
        scale = text[:1] in ("*", "x")
        try:
            value = float(text[1:] if scale else text)
        except ValueError:
            raise ValueError(f"Intervention on {node_id!r}: {spec!r} is not a number, 'ablate' or a scale such as "
                             "'*2' / 'x0.5'.") from None
    else:
        value, scale = float(spec), False
    if not math.isfinite(value):
        raise ValueError(f"Intervention on {node_id!r}: {spec!r} is not finite; give a finite value or scale.")
    return Scale(value) if scale else value


@dataclass
class InterventionResult:
    """Last-token logits ``[d_vocab]`` before and after, and the top tokens (text, probability) of each."""

    logits_before: torch.Tensor
    logits_after: torch.Tensor
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]


@dataclass
class GenerationResult:
    """Greedy continuations of the prompt without and with the interventions (token ids and text)."""

    tokens_before: list[int]
    tokens_after: list[int]
    text_before: str
    text_after: str


def _apply(value: torch.Tensor, spec: float | Scale) -> torch.Tensor:
    return value * spec.factor if isinstance(spec, Scale) else torch.full_like(value, spec)


def _close_ids(node_id: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(node_id, list(known), n=4, cutoff=0.4)
    return f" Close: {close}." if close else ""


class _Plan:
    """The interventions of one run, grouped by what they patch (checked against the model on creation)."""

    def __init__(self, model: Any, interventions: Mapping[str, Spec]) -> None:
        self.rm = model if isinstance(model, ReplacementModel) else None
        self.model: HookedTransformer = model.model if isinstance(model, ReplacementModel) else model
        self.features: dict[str, list[tuple[int | None, int, float | Scale]]] = {}  # site -> (pos, feature, spec)
        self.errors: dict[str, list[tuple[int | None, float | Scale]]] = {}
        self.components: list[tuple[Node, float | Scale]] = []
        for node_id, raw in interventions.items():
            node = parse_node_id(node_id)
            spec = parse_spec(node_id, raw)
            if node.kind in ("feature", "error"):
                self._check_site(node_id, node)
                if node.kind == "feature":
                    self.features.setdefault(str(node.site), []).append((node.pos, int(node.feature or 0), spec))
                else:
                    self.errors.setdefault(str(node.site), []).append((node.pos, spec))
            elif node.kind in ("head", "mlp"):
                self._check_component(node_id, node)
                self.components.append((node, spec))
            else:
                raise ValueError(f"Cannot intervene on {node_id!r} ({node.kind}): give feature or error ids "
                                 "('mlp2:113@5', 'mlp2:113', 'mlp2:error@5') or heads/MLPs ('L3.H2', 'L3.MLP').")

    def _check_site(self, node_id: str, node: Node) -> None:
        if self.rm is None:
            raise ValueError(f"{node_id!r} is a feature-level node: pass a ReplacementModel (or dictionaries=).")
        names = [s.name for s in self.rm.sites]
        if node.site not in names:
            raise ValueError(f"No site {node.site!r} for {node_id!r}; the model's sites are {names}.")
        site = self.rm.site(str(node.site))
        if node.kind == "feature":
            if site.dictionary is None:
                covered = [s.name for s in self.rm.sites if s.dictionary is not None]
                raise ValueError(f"{node_id!r}: site {node.site} has no dictionary (sites with features: {covered}).")
            if not 0 <= int(node.feature or 0) < site.d_sae:
                raise ValueError(f"{node_id!r}: feature {node.feature} is outside {node.site}'s {site.d_sae} features.")

    def _check_component(self, node_id: str, node: Node) -> None:
        cfg = self.model.cfg
        if not 0 <= int(node.layer or 0) < cfg.n_layers or (node.kind == "head" and not 0 <= int(node.head or 0) < cfg.n_heads):
            known = [f"L{layer}.H{h}" for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
            raise ValueError(f"No component {node_id!r} in this {cfg.n_layers}-layer, {cfg.n_heads}-head model."
                             + _close_ids(node_id, known))
        if node.kind == "mlp" and cfg.attn_only:
            raise ValueError(f"{node_id!r}: this model is attention-only; it has no MLPs.")

    def check_positions(self, n_pos: int) -> None:
        for site, entries in [*self.features.items(), *self.errors.items()]:
            for entry in entries:
                pos = entry[0]
                if pos is not None and not -n_pos <= pos < n_pos:
                    raise ValueError(f"An intervention at {site}@{pos} is outside the {n_pos}-token prompt.")

    # -- patches ------------------------------------------------------------------------------

    def feature_patches(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        def patch(entries):
            def apply(acts: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_sae]
                acts = acts.clone()
                for pos, feature, spec in entries:
                    where = slice(None) if pos is None else pos
                    acts[:, where, feature] = _apply(acts[:, where, feature], spec)
                return acts
            return apply

        return {site: patch(entries) for site, entries in self.features.items()}

    def error_patches(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        def patch(entries):
            def apply(error: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_model]
                error = error.clone()
                for pos, spec in entries:
                    where = slice(None) if pos is None else pos
                    # an error term is a vector: "ablate" removes it, a scale scales it, a value sets every entry
                    error[:, where] = _apply(error[:, where], spec)
                return error
            return apply

        return {site: patch(entries) for site, entries in self.errors.items()}

    def component_hooks(self) -> FwdHooks:
        hooks: FwdHooks = []
        for node, spec in self.components:
            if node.kind == "head":
                def head(z, hook, h=node.head, spec=spec):  # z [batch, pos, head, d_head]
                    z = z.clone()
                    z[:, :, h] = _apply(z[:, :, h], spec)
                    return z
                hooks.append((f"blocks.{node.layer}.attn.hook_z", head))
            else:
                hooks.append((f"blocks.{node.layer}.hook_mlp_out", lambda out, hook, spec=spec: _apply(out, spec)))
        return hooks

    # -- running ------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, patched: bool) -> torch.Tensor:
        """Logits ``[pos, d_vocab]`` of ``tokens [pos]``, with or without the interventions."""
        hooks = self.component_hooks() if patched else []
        with self.model.hooks(fwd_hooks=hooks):
            if self.rm is not None:
                patches = (self.feature_patches(), self.error_patches()) if patched else ({}, {})
                return self.rm.run(tokens, feature_acts=patches[0], errors=patches[1]).logits[0]
            return self.model(tokens[None])[0]


def _replacement_or_model(model: Any, dictionaries: Sequence[Any] | None) -> Any:
    if dictionaries is not None:
        if isinstance(model, ReplacementModel):
            raise ValueError("model is already a ReplacementModel; leave dictionaries=None.")
        return ReplacementModel(model, list(dictionaries))
    return model


def _tokens(model: Any, prompt: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(model, ReplacementModel):
        return model.to_tokens(prompt)
    if isinstance(prompt, str):
        return model.to_tokens(prompt)[0]
    return torch.as_tensor(prompt, dtype=torch.long, device=model.cfg.device).reshape(-1)


def _top(model: Any, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(k, probs.numel()))
    tokenizer = getattr(model, "tokenizer", None)
    names = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids.tolist()]
    return list(zip(names, [float(v) for v in values], strict=True))


def intervene(model: Any, prompt: str | torch.Tensor | Sequence[int], interventions: Mapping[str, Spec], *,
              dictionaries: Sequence[Any] | None = None, top_k: int = 5) -> InterventionResult:
    """The model's last-token logits on ``prompt`` without and with ``interventions``.

    Args:
        model: a :class:`ReplacementModel` (feature and error nodes, and components), a HookedTransformer
            (components only), or a HookedTransformer with ``dictionaries``.
        prompt: text or token ids ``[pos]``.
        interventions: node id -> spec (see the module docstring).
        top_k: how many top tokens to list.
    """
    model = _replacement_or_model(model, dictionaries)
    plan = _Plan(model, interventions)
    tokens = _tokens(model, prompt)
    plan.check_positions(int(tokens.shape[0]))
    before, after = plan.logits(tokens, False)[-1], plan.logits(tokens, True)[-1]
    base = plan.model
    return InterventionResult(before, after, _top(base, before, top_k), _top(base, after, top_k))


def generate(model: Any, prompt: str | torch.Tensor | Sequence[int], interventions: Mapping[str, Spec], *,
             dictionaries: Sequence[Any] | None = None, max_new_tokens: int = 20) -> GenerationResult:
    """Greedy generation from ``prompt`` without and with ``interventions`` held at every step.

    Ids without a position (``mlp2:113``) act at every position, the generated ones included; ids with one act
    at that prompt position only. Each step reruns the whole sequence (exact, and cheap at these lengths).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least one token.")
    model = _replacement_or_model(model, dictionaries)
    plan = _Plan(model, interventions)
    prompt_tokens = _tokens(model, prompt)
    plan.check_positions(int(prompt_tokens.shape[0]))
    n_ctx = plan.model.cfg.n_ctx
    results = []
    for patched in (False, True):
        tokens = prompt_tokens
        for _ in range(min(max_new_tokens, n_ctx - int(prompt_tokens.shape[0]))):
            next_token = plan.logits(tokens, patched)[-1].argmax()
            tokens = torch.cat([tokens, next_token[None]])
        results.append(tokens[prompt_tokens.shape[0]:].tolist())
    tokenizer = getattr(plan.model, "tokenizer", None)
    texts = [tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids)) for ids in results]
    return GenerationResult(results[0], results[1], texts[0], texts[1])

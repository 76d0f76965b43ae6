"""Feature and error nodes of a ReplacementModel, ablated through its patches, batched.

Units are the features of every spliced dictionary and every site's error term, either at each token
position (ids ``"mlp3:1207@5"``, ``"mlp3:error@5"``, the graph's node id scheme) or summed over
positions (``"mlp3:1207"``, ``"mlp3:error"``: one unit ablates that feature at every position). Only
features whose ablation changes something (clean value differs from its ablation value in some
prompt) are candidates. The live replacement model is run, so features downstream of an ablation are
recomputed from their changed inputs; copies of a prompt in one batch carry different keep-masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from ..nodes import Node
from ..patching.ablation import (
    ablation_value,
    check_ablation,
    held_at,
    interpolation_alphas,
    mix,
    pad_prompts,
)
from ..patching.windows import first_differences, frozen_prefix_cache
from .tasks import ContrastiveTask, get_metric

__all__ = ["FeatureGraph"]


class FeatureGraph:
    """Feature/error nodes of ``replacement`` (a :class:`featcircuits.graph.ReplacementModel`) for ``task``.

    Args:
        replacement: the model with dictionaries spliced in.
        task: contrastive task; each prompt is run at its own length.
        ablation: ``zero``, ``mean`` or ``patch`` (the corrupt prompt's feature activations and errors).
        metric: as for :class:`ComponentGraph`.
        sites: site names whose features become nodes (default: every site with a dictionary); error
            nodes are made for every site. A requested site without a dictionary is an error.
        positions: ``"each"`` (a node per position) or ``"sum"`` (a node per feature).
        max_copies: most patterns per forward.
        skip_clean_prefix: under patch ablation, each prompt's positions before its first token where clean and
            corrupt differ hold no node (clean equals ablated there), so every pattern's forward is the clean
            run there: ablation forwards run the later positions only, with the model's clean keys and values
            before them. ``False`` runs every prompt whole.
    """

    measured_in = "live replacement"  # the model its ablations run in (Circuit.measured_in)

    def __init__(self, replacement, task: ContrastiveTask, ablation: str = "patch",
                 metric: str | Callable = "logit_diff", sites: Sequence[str] | None = None,
                 positions: str = "each", max_copies: int = 64, skip_clean_prefix: bool = True) -> None:
        if positions not in ("each", "sum"):
            raise ValueError(f"positions={positions!r}; choose 'each' or 'sum'.")
        self.rm, self.task, self.ablation = replacement, task, check_ablation(ablation)
        self.metric_fn, self.positions, self.max_copies = get_metric(metric), positions, max_copies
        covered = [s.name for s in replacement.sites if s.dictionary is not None]
        if sites is None:
            sites = covered
        missing = [s for s in sites if s not in covered]
        if missing:
            raise ValueError(
                f"No dictionary covers site(s) {missing}; the dictionaries cover {covered}. Load dictionaries "
                "for those sites or drop them from `sites`."
            )
        self.feature_sites = list(sites)
        self.skip_clean_prefix = skip_clean_prefix
        self.forwards = 0
        self._collect_values()
        self._clean_prefixes = self._prefix_keys_values()
        self._build_units()
        with torch.no_grad():
            self.full_metric = float(self.node_metric(torch.ones(1, len(self.node_ids)))[0])

    @property
    def _width(self) -> int:
        """Positions of the longest prompt (the grid node masks and attributions are laid out on)."""
        return int(self.task.clean_last.max()) + 1

    # -- clean, corrupt and ablation values -------------------------------------------------------

    def _prompt(self, index: int, corrupt: bool = False) -> torch.Tensor:
        tokens = self.task.corrupt_tokens if corrupt else self.task.clean_tokens
        last = self.task.corrupt_last if corrupt else self.task.clean_last
        return tokens[index, : int(last[index]) + 1]

    def _collect_values(self) -> None:
        n = len(self.task)
        clean_runs = [self.rm.clean_run(self._prompt(i)) for i in range(n)]
        corrupt_runs = [self.rm.clean_run(self._prompt(i, True)) for i in range(n)] if self.ablation == "patch" else None
        self.forwards += n * (1 + int(corrupt_runs is not None))
        self.clean_last = torch.stack([run.logits[-1] for run in clean_runs])
        # per prompt, per site: (clean, ablated) features [pos, d_sae] and errors [pos, d_model]
        self.values: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
        width = max(run.n_pos for run in clean_runs + (corrupt_runs or []))
        for site in self.rm.sites:
            kinds = [("error", "errors")] + ([("feat", "feature_acts")] if site.name in self.feature_sites else [])
            for key, field in kinds:
                clean = [getattr(run, field)[site.name] for run in clean_runs]
                # the one definition of each ablation, on the prompts right-padded to the longest
                padded, clean_lengths = pad_prompts(clean, width)
                corrupt, corrupt_lengths = (None, None) if corrupt_runs is None else pad_prompts(
                    [getattr(run, field)[site.name] for run in corrupt_runs], width)
                value = ablation_value(self.ablation, padded, corrupt, clean_lengths, corrupt_lengths)
                value = value.expand_as(padded)
                ablated = [value[i, : c.shape[0]] for i, c in enumerate(clean)]
                for i in range(n):
                    self.values[i][f"{key}:{site.name}"] = (clean[i], ablated[i])

    def _build_units(self) -> None:
        """Node ids and, per site, index tensors locating each unit."""
        self.node_ids: list[str] = []
        self._site_units: list[tuple[str, str, int, torch.Tensor, torch.Tensor]] = []  # key, site, start, pos, feat
        width = self._width
        for site in self.rm.sites:
            kinds = ["feat", "error"] if site.name in self.feature_sites else ["error"]
            for kind in kinds:
                key = f"{kind}:{site.name}"
                changed = torch.zeros(width, *self.values[0][key][0].shape[1:], dtype=torch.bool,
                                      device=self.values[0][key][0].device)
                for per_prompt in self.values:
                    clean, ablated = per_prompt[key]
                    changed[: clean.shape[0]] |= clean != ablated
                if kind == "error":
                    changed = changed.any(-1, keepdim=True)
                if self.positions == "sum":
                    feats = changed.any(0).nonzero()[:, 0]
                    pos = torch.full_like(feats, -1)
                else:
                    pos, feats = changed.nonzero(as_tuple=True)
                self._site_units.append((key, site.name, len(self.node_ids), pos, feats))
                node_kind = "error" if kind == "error" else "feature"
                for feature, at in zip(feats.tolist(), pos.tolist(), strict=True):
                    node = Node(node_kind, None if self.positions == "sum" else at, site=site.name,
                                feature=None if kind == "error" else feature)
                    self.node_ids.append(node.id)
        self.edge_ids: list[tuple[str, str]] = []

    def _prefix_keys_values(self) -> list[list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Per prompt, the model's keys and values ``[1, prefix, heads, d_head]`` per layer at the positions
        before its first clean/corrupt difference (``None`` where there are none to skip)."""
        prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        model, task = self.rm.model, self.task
        # (a corrupt prompt shorter than its clean one differs at its padding: a prefix no longer than needed)
        firsts = first_differences(task.clean_tokens, task.corrupt_tokens, task.clean_last).tolist()
        for index, first in enumerate(firsts):
            clean = self._prompt(index)
            if self.ablation != "patch" or not self.skip_clean_prefix or first == 0:
                prefixes.append(None)
                continue
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, clean.device, 1)
            with torch.no_grad():
                prefix = clean[None, :first]
                model(prefix, past_kv_cache=cache, attention_mask=torch.ones_like(prefix))
            self.forwards += 1
            prefixes.append([(entry.past_keys, entry.past_values) for entry in cache.entries])
        return prefixes

    # -- running ------------------------------------------------------------------------------

    def _site_masks(self, keep: torch.Tensor, n_pos: int) -> dict[str, torch.Tensor]:
        """``keep [copies, units]`` -> per value key a keep tensor ``[copies, n_pos, d | 1]``."""
        masks = {}
        for key, _, start, pos, feats in self._site_units:
            d = self.values[0][key][0].shape[-1] if key.startswith("feat") else 1
            mask = torch.ones(keep.shape[0], n_pos, d, device=keep.device, dtype=keep.dtype)
            unit_keep = keep[:, start:start + len(feats)]
            if self.positions == "sum":
                mask[:, :, feats] = unit_keep[:, None, :]
            else:
                inside = pos < n_pos
                mask[:, pos[inside], feats[inside]] = unit_keep[:, inside]
            masks[key] = mask
        return masks

    def _run_prompt(self, index: int, patches: dict[str, Callable], copies: int,
                    past_kv_cache: TransformerLensKeyValueCache | None = None) -> torch.Tensor:
        """Last-token logits ``[copies, vocab]`` of prompt ``index`` under ``patches``; with ``past_kv_cache``
        (a prefix's keys and values) only the positions after the prefix run, and the patches cover those."""
        feature_patches = {k.split(":", 1)[1]: p for k, p in patches.items() if k.startswith("feat:")}
        error_patches = {k.split(":", 1)[1]: p for k, p in patches.items() if k.startswith("error:")}
        self.forwards += 1
        tokens = self._prompt(index)
        if past_kv_cache is not None:
            tokens = tokens[past_kv_cache.previous_attention_mask.shape[1]:]
        out = self.rm.run(tokens, feature_acts=feature_patches, errors=error_patches, batch_size=copies,
                          past_kv_cache=past_kv_cache)
        return out.logits[:, -1]

    def _prefix_cache(self, index: int, copies: int) -> TransformerLensKeyValueCache | None:
        """Prompt ``index``'s clean prefix keys and values for ``copies`` rows, frozen; ``None`` if none."""
        prefix = self._clean_prefixes[index]
        if prefix is None:
            return None
        return frozen_prefix_cache([(keys.expand(copies, -1, -1, -1), values.expand(copies, -1, -1, -1))
                                    for keys, values in prefix])

    def node_metric(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep [copies, n_nodes]`` -> metric ``[copies]``; one forward per prompt per ``max_copies``."""
        keep = keep.to(self.clean_last.device, torch.float32)
        return torch.cat([self._node_metric_chunk(chunk) for chunk in keep.split(self.max_copies)])

    @torch.no_grad()
    def _node_metric_chunk(self, keep: torch.Tensor) -> torch.Tensor:
        last = []
        # built once at the longest prompt's width; each prompt reads its own positions
        all_masks = self._site_masks(keep, self._width)
        for index, per_prompt in enumerate(self.values):
            n_pos = int(self.task.clean_last[index]) + 1
            cache = self._prefix_cache(index, keep.shape[0])
            skip = 0 if cache is None else cache.previous_attention_mask.shape[1]  # positions the cache holds
            masks = {key: mask[:, skip:n_pos] for key, mask in all_masks.items()}
            patches = {key: (lambda cur, a=per_prompt[key][1][skip:], k=masks[key]: mix(cur, a, k)) for key in masks}
            last.append(self._run_prompt(index, patches, keep.shape[0], cache))
        return self.metric_fn(self.task, torch.stack(last, dim=1), self.clean_last)

    def node_attribution(self, steps: int = 1) -> torch.Tensor:
        """AtP (``steps=1``) / AtP-IG node scores ``[n_nodes]``: ``(ablated - clean) . mean_alpha grad``.

        Every feature and error value is set to ``clean + alpha * (ablated - clean)`` with gradients passing
        through as the identity, so a node's gradient includes its paths through downstream features.
        """
        device = self.clean_last.device
        alphas = interpolation_alphas(steps, device).view(-1, 1, 1)
        leaves, last = [], []
        with torch.enable_grad():
            for index, per_prompt in enumerate(self.values):
                patches, prompt_leaves = {}, {}
                for key, (clean, ablated) in per_prompt.items():
                    if key.startswith("feat:") and key.split(":", 1)[1] not in self.feature_sites:
                        continue
                    target = (clean + alphas * (ablated - clean)).requires_grad_()
                    prompt_leaves[key] = target
                    patches[key] = lambda cur, t=target: held_at(cur, t)
                leaves.append(prompt_leaves)
                last.append(self._run_prompt(index, patches, steps))
            total = self.metric_fn(self.task, torch.stack(last, dim=1), self.clean_last).sum() / steps
            flat = [leaf for prompt_leaves in leaves for leaf in prompt_leaves.values()]
            grads = iter(torch.autograd.grad(total, flat, allow_unused=True))
        scores = torch.zeros(len(self.node_ids), device=device)
        width = self._width
        for index, prompt_leaves in enumerate(leaves):
            contributions = {}
            for key, _leaf in prompt_leaves.items():
                grad = next(grads)
                clean, ablated = self.values[index][key]
                value = ((ablated - clean) * (grad.sum(0) if grad is not None else 0.0))
                if key.startswith("error:"):
                    value = value.sum(-1, keepdim=True)
                contributions[key] = torch.nn.functional.pad(value, (0, 0, 0, width - value.shape[0]))
            for key, _, start, pos, feats in self._site_units:
                values = contributions[key]
                unit = values.sum(0)[feats] if self.positions == "sum" else values[pos, feats]
                scores[start:start + len(feats)] += unit
        return scores

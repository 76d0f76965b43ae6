"""Recovering tracr ground truth: tasks, the true feature circuit, and ROC AUC of found circuits.

Components: a head or MLP is in the true circuit when the compiler gave it weights; an edge when the
sender writes a residual label the receiver reads (:class:`featcircuits.groundtruth.tracr_model.TracrModel`).

Features: SAEs on the residual stream (:mod:`featcircuits.groundtruth.tracr_saes`) are scored against the
program's dataflow at two grains.

* Variables (:func:`variable_truth_units`): the unit is (site, program variable), the SOp a label belongs
  to (``tokens:BOS`` is a value of ``tokens``; the compiler's constant ``one`` is not a variable). Variable
  ``v`` at ``resid_pre{L}`` is in the true circuit when a head or MLP of layer ``L`` or later reads a label
  of ``v`` (or ``v`` is the output); at the final ``resid_post`` only the output. Variables whose labels
  coincide at a site are one unit. This is RASP's own dataflow graph (an SOp reads another SOp), and it
  is identifiable: see the note below.
* Labels (:func:`feature_truth_units`): the unit is (site, label group), the same rule per label. Finer
  than the program: tracr's lookup-table MLP for ``tokens == "x"`` has weights only on ``tokens:x``.

Why labels are not identifiable from activations: every position holds exactly one value of each
categorical variable, so for any vector ``s`` the directions ``e_value + s`` of one variable and ``e - s``
of another (or ``b_dec - s``) reconstruct every residual vector exactly, with the same codes. An L1
penalty picks the shift that centres each variable (feature ``e_value - mean``), the usual outcome of SAE
training: each feature then stays inside its variable's subspace (so the shift leaves variable units
alone; feature absorption of correlated variables does not), but ablating ``tokens:w`` moves ``tokens:x``
towards the mean, so a label unit the program never reads has an effect.

MLP units: bare MLPs are error nodes, scored against whether the MLP has weights.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..circuits.tasks import ContrastiveTask
from .tracr_model import TracrModel

__all__ = ["tracr_task", "label_recovery", "feature_truth_units", "variable_truth_units", "variable_of"]

# Compiler plumbing that is never a unit: the constant direction and the (never used) padding token.
_NOT_UNITS = ("one", "tokens:compiler_pad")


def variable_of(label: str) -> str:
    """Program variable (SOp) of a residual label: ``"opp_idx_4:-3" -> "opp_idx_4"``, ``"tokens:BOS" -> "tokens"``."""
    return label.split(":")[0]


def _inputs(tm: TracrModel, count: int, seed: int, length: int | None = None) -> list[list]:
    vocab = sorted((v for v in tm.input_encoding if v not in ("BOS", "compiler_pad")), key=str)
    rng = random.Random(seed)
    n = length or tm.model.cfg.n_ctx - 1
    return [[rng.choice(vocab) for _ in range(n)] for _ in range(count)]


def tracr_task(tm: TracrModel, n_pairs: int = 8, seed: int = 0) -> ContrastiveTask:
    """Clean/corrupt pairs of random inputs one token shorter than the maximum (at full length a zeroed
    length computation would read as the maximum length and look unused); the answer is the clean output
    at the last position (its logit is the metric; a numerical output has one logit, the value itself)."""
    from tracr.rasp import rasp

    pairs, attempts = [], 0
    length = max(1, tm.model.cfg.n_ctx - 2)
    for clean, corrupt in zip(_inputs(tm, 50 * n_pairs, seed, length), _inputs(tm, 50 * n_pairs, seed + 1, length),
                              strict=True):
        attempts += 1
        value = rasp.evaluate(tm.program, clean)[-1]
        if value is None or (tm.output_values is None and not value):
            continue  # skip inputs whose last output is undefined, or a numerical zero (nothing to explain)
        answer = 0 if tm.output_values is None else tm.output_values.index(value)
        pairs.append({"clean": tm.encode(clean), "corrupt": tm.encode(corrupt), "answer": answer})
        if len(pairs) == n_pairs:
            break
    if not pairs:
        raise ValueError(f"No input of {tm.output_label} has a defined, non-zero output at the last position.")
    return ContrastiveTask.from_pairs(tm.model, pairs, source=f"tracr task {tm.output_label}")


def _varying_rows(tm: TracrModel, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Residual rows ``{hook: [rows, d_model]}`` of random inputs of every length (the SAEs' data distribution)."""
    from .tracr_saes import TracrSource

    return TracrSource(tm, hooks, inputs_per_length=128, seed=99).next_chunk()


def _label_groups(tm: TracrModel, hooks: list[str]) -> dict[str, list[list[int]]]:
    """Per hook, the labels that vary over random inputs of every length, grouped where their activations
    are identical (a token and a map that copies it): no dictionary can tell such labels apart."""
    groups = {}
    for hook, acts in _varying_rows(tm, hooks).items():
        varying = (acts.std(0) > 1e-6).nonzero()[:, 0]
        columns = acts[:, varying]
        # same[i, j]: labels i and j have identical activations on every row
        same = (columns[:, :, None] - columns[:, None, :]).abs().amax(0) < 1e-6
        first = same.float().argmax(0)  # each label's first identical label names its group
        groups[hook] = [varying[first == leader].tolist() for leader in first.unique().tolist()]
    return groups


def _unit_vectors(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _group_cosines(tm: TracrModel, sae, groups: list[list[int]]) -> torch.Tensor:
    """``[d_sae, groups]`` |cosine| of each decoder row with each group's direction (normalised sum)."""
    targets = torch.zeros(len(groups), tm.model.cfg.d_model)
    for index, group in enumerate(groups):
        targets[index, group] = 1.0 / len(group) ** 0.5
    return (_unit_vectors(sae.W_dec.detach().float().cpu()) @ targets.T).abs()


def label_recovery(tm: TracrModel, saes: list) -> dict[str, float]:
    """For every group of labels that varies at a site: the best |cosine| of an SAE decoder row with it."""
    groups = _label_groups(tm, [sae.cfg.hook_in for sae in saes])
    best = torch.cat([_group_cosines(tm, sae, groups[sae.cfg.hook_in]).max(0).values for sae in saes])
    return {"directions": float(best.numel()), "mean_cosine": float(best.mean()), "min_cosine": float(best.min()),
            "recovered_0.9": float((best >= 0.9).float().mean())}


def _read_from(tm: TracrModel) -> dict[int, set[int]]:
    """Layer ``L`` -> residual labels read by a head or MLP of layer ``L`` or later, or holding the output."""
    rw = tm._reads_writes()
    later = {i for i, label in enumerate(tm.residual_labels) if variable_of(label) == tm.output_label}
    read_from: dict[int, set[int]] = {}
    for layer in reversed(range(tm.model.cfg.n_layers)):
        for name, (reads, _) in rw.items():
            if name.startswith(f"L{layer}."):
                later |= set(reads.nonzero()[:, 0].tolist())
        read_from[layer] = set(later)
    return read_from


def _positives(tm: TracrModel, site: Any, read_from: dict[int, set[int]]) -> set[int]:
    if site.hook_out.endswith("resid_post"):
        return {i for i, label in enumerate(tm.residual_labels) if variable_of(label) == tm.output_label}
    return read_from[site.layer]


def _feature_magnitudes(graph: Any, site: Any, node_scores: torch.Tensor) -> torch.Tensor:
    """``[d_sae]`` |score| of each feature of ``site`` (0 where the feature is no node: it never changed)."""
    magnitudes = torch.zeros(site.dictionary.cfg.d_sae)
    prefix = f"{site.name}:"
    found = [(int(node_id[len(prefix):]), i) for i, node_id in enumerate(graph.node_ids)
             if node_id.startswith(prefix) and node_id[len(prefix):].isdigit()]
    if found:
        features, indices = torch.tensor(found).T
        magnitudes[features] = node_scores.abs().float().cpu()[indices]
    return magnitudes


def _error_unit(tm: TracrModel, graph: Any, site: Any, node_scores: torch.Tensor) -> tuple[str, float, bool]:
    index = {node_id: i for i, node_id in enumerate(graph.node_ids)}.get(f"{site.name}:error")
    score = float(node_scores[index].abs()) if index is not None else 0.0  # no node: its output never changes
    return f"{site.name}:error", score, bool(tm._reads_writes()[f"L{site.layer}.MLP"][1].any())


def feature_truth_units(tm: TracrModel, graph: Any, node_scores: torch.Tensor,
                        min_cosine: float = 0.7) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Label-grain units ``(names, scores, truth)`` for a feature graph (``positions="sum"``) built on a
    ReplacementModel of ``tm.model`` with residual SAEs.

    Units: every varying label group at every SAE site (the constant ``one`` and ``tokens:BOS``, the
    compiler's attention sink, left out) and every MLP (its bare-site error node). A group is true when a
    label of it is read at or after the site's layer (at the final ``resid_post``: holds the output); it
    scores the largest |score| among features whose decoder row has |cosine| >= ``min_cosine`` with it.
    """
    read_from = _read_from(tm)
    sae_sites = [site for site in graph.rm.sites if site.dictionary is not None]
    groups = _label_groups(tm, [site.hook_in for site in sae_sites])
    bos = tm.residual_labels.index("tokens:BOS") if "tokens:BOS" in tm.residual_labels else -1
    names, scores, truth = [], [], []
    for site in graph.rm.sites:
        if site.dictionary is None:
            name, score, true = _error_unit(tm, graph, site, node_scores)
            names.append(name)
            scores.append(score)
            truth.append(true)
            continue
        site_groups = [g for g in groups[site.hook_in] if g != [bos]]
        members = _group_cosines(tm, site.dictionary, site_groups) >= min_cosine  # [d_sae, groups]
        magnitudes = _feature_magnitudes(graph, site, node_scores)
        best = (members * magnitudes[:, None]).amax(0)
        positives = _positives(tm, site, read_from)
        for group, score in zip(site_groups, best.tolist(), strict=True):
            names.append(f"{site.name}:" + "+".join(tm.residual_labels[i] for i in group))
            scores.append(score)
            truth.append(any(i in positives for i in group))
    return names, torch.tensor(scores), torch.tensor(truth)


def _merged_variables(group_variables: torch.Tensor) -> list[list[int]]:
    """Variables that share a label group (``[groups, variables]`` bool) merged into one unit: at that site
    their values coincide on every input (``opp_idx - 1`` and ``opp_idx`` at one length), so no feature
    can belong to one and not the other."""
    units: list[set[int]] = []
    for row in group_variables:
        linked = set(row.nonzero()[:, 0].tolist())
        if not linked:
            continue
        touching = [unit for unit in units if unit & linked]
        for unit in touching:
            units.remove(unit)
            linked |= unit
        units.append(linked)
    return sorted(sorted(unit) for unit in units)


def variable_truth_units(tm: TracrModel, graph: Any,
                         node_scores: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Variable-grain units ``(names, scores, truth)`` for a feature graph (``positions="sum"``).

    Units: every program variable with a label that varies at an SAE site, and every MLP (its error
    node). Variables whose labels coincide at the site are one unit. A feature belongs to the variables of
    the label group its decoder row is closest to (|cosine|); a unit scores the largest |score| among its
    features, and is true when a label of it is read at or after the site's layer (at the final
    ``resid_post``: it is the output).
    """
    read_from = _read_from(tm)
    labels = tm.residual_labels
    variables = sorted({variable_of(label) for label in labels if label not in _NOT_UNITS})
    membership = torch.zeros(len(labels), len(variables))  # [d_model, variables]
    for index, label in enumerate(labels):
        if label not in _NOT_UNITS:
            membership[index, variables.index(variable_of(label))] = 1.0
    sae_sites = [site for site in graph.rm.sites if site.dictionary is not None]
    groups = _label_groups(tm, [site.hook_in for site in sae_sites])
    names, scores, truth = [], [], []
    for site in graph.rm.sites:
        if site.dictionary is None:
            name, score, true = _error_unit(tm, graph, site, node_scores)
            names.append(name)
            scores.append(score)
            truth.append(true)
            continue
        site_groups = [g for g in groups[site.hook_in] if not all(labels[i] in _NOT_UNITS for i in g)]
        group_variables = torch.stack([membership[g].amax(0) for g in site_groups])  # [groups, variables]
        nearest = _group_cosines(tm, site.dictionary, site_groups).argmax(-1)  # [d_sae]
        magnitudes = _feature_magnitudes(graph, site, node_scores)
        best = ((group_variables[nearest] > 0) * magnitudes[:, None]).amax(0)  # [variables]
        positives = torch.zeros(len(labels), dtype=torch.bool)
        positives[list(_positives(tm, site, read_from))] = True
        true_variables = (membership[positives] > 0).any(0)
        for unit in _merged_variables(group_variables > 0):
            names.append(f"{site.name}:" + "+".join(variables[v] for v in unit))
            scores.append(float(best[unit].max()))
            truth.append(bool(true_variables[unit].any()))
    return names, torch.tensor(scores), torch.tensor(truth)

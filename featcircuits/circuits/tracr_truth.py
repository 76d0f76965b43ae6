"""Recovering tracr ground truth: tasks, residual-stream SAEs, and ROC AUC of found circuits.

Components: a head or MLP is in the true circuit when the compiler gave it weights; an edge when the
sender writes a residual label the receiver reads (:class:`featcircuits.circuits.tracr.TracrModel`).

Features: SAEs on the residual stream (``resid_pre`` of every layer and the final ``resid_post``) should
learn tracr's labelled directions. Each feature is assigned the label its decoder row points along, and
labels are grouped into program variables (the SOp a label belongs to; ``tokens:BOS`` apart as the
compiler's attention sink; the compiler's constant ``one`` is left out). The true feature circuit is the
program's dataflow through the residual stream: variable ``v`` at ``resid_pre{L}`` is in it when a head
or MLP of layer ``L`` or later reads ``v`` (or ``v`` is the output), at the final ``resid_post`` only the
output. A unit ``(site, variable)`` scores the largest |score| of its features; bare MLP error nodes
(the whole MLP) are scored against whether the MLP has weights.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .tasks import ContrastiveTask
from .tracr import TracrModel

__all__ = ["tracr_task", "train_residual_saes", "label_recovery", "feature_truth_units", "variable_of"]


def variable_of(label: str) -> str:
    """Program variable of a residual label: ``"opp_idx_4:-3" -> "opp_idx_4"``; ``tokens:BOS -> "BOS"``."""
    return "BOS" if label == "tokens:BOS" else label.split(":")[0]


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


def residual_sites(tm: TracrModel) -> list[str]:
    last = tm.model.cfg.n_layers - 1
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(last + 1)] + [f"blocks.{last}.hook_resid_post"]


def _fit_sae(acts: torch.Tensor, d_sae: int, steps: int, l1: float, seed: int, hook: str, model_name: str):
    """A ReLU SAE fitted full-batch to the distinct rows of ``acts [rows, d_model]``, weighted by frequency.

    Loss: squared error plus ``l1`` times the decoder-norm-weighted L1 of the feature activations, Adam
    with a cosine learning-rate decay. The decoder bias is fixed to the data's constant part (tracr's
    ``one`` direction, the sum of the one-hot token directions): left free, every feature would have to
    carry a share of it and would point between labels.
    """
    from ..dictionaries import Dictionary, DictionaryConfig

    generator = torch.Generator().manual_seed(seed)
    cfg = DictionaryConfig(d_in=acts.shape[1], d_sae=d_sae, activation="relu", hook_in=hook, hook_out=hook,
                           layer=int(hook.split(".")[1]), model_name=model_name, dataset="tracr random inputs",
                           apply_b_dec_to_input=True)
    sae = Dictionary.from_config(cfg)
    rows, counts = torch.unique(acts, dim=0, return_counts=True)
    weights = counts.float() / counts.sum()
    with torch.no_grad():
        constant = rows.std(0) < 1e-6
        sae.b_dec.copy_(torch.where(constant, rows.mean(0), torch.zeros_like(rows[0])))
        W_dec = torch.randn(d_sae, acts.shape[1], generator=generator)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec], lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    centred = rows - sae.b_dec
    with torch.enable_grad():
        for _ in range(steps):
            feature_acts = torch.relu(centred @ sae.W_enc + sae.b_enc)
            error = (feature_acts @ sae.W_dec - centred).pow(2).sum(-1)
            sparsity = (feature_acts * sae.W_dec.norm(dim=-1)).sum(-1)
            loss = ((error + l1 * sparsity) * weights).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    sae.requires_grad_(False)
    return sae.eval()


def train_residual_saes(tm: TracrModel, steps: int = 1500, n_inputs: int = 512, expansion: int = 1,
                        l1: float = 0.05, seed: int = 0) -> list:
    """ReLU SAEs on every residual site (``resid_pre`` of each layer and the final ``resid_post``), fitted to
    the residual vectors of ``n_inputs`` random program inputs. Width ``expansion * d_model``: the
    distinct residual vectors are few, and a wider dictionary memorises combinations of labels (one
    feature per combination costs less L1 than one per label)."""
    tokens = torch.tensor([tm.encode(x) for x in _inputs(tm, n_inputs, seed + 7)])
    hooks = residual_sites(tm)
    with torch.no_grad():
        _, cache = tm.model.run_with_cache(tokens, names_filter=hooks)
    d_model = tm.model.cfg.d_model
    return [_fit_sae(cache[hook].reshape(-1, d_model), expansion * d_model, steps, l1, seed + i, hook,
                     tm.model.cfg.model_name) for i, hook in enumerate(hooks)]


def _label_groups(tm: TracrModel, hooks: list[str]) -> dict[str, list[list[int]]]:
    """Per hook, the labels that vary over random inputs, grouped where their activations are identical
    (a token and a map that copies it): no dictionary can tell such labels apart."""
    tokens = torch.tensor([tm.encode(x) for x in _inputs(tm, 256, 99)])
    with torch.no_grad():
        _, cache = tm.model.run_with_cache(tokens, names_filter=hooks)
    groups = {}
    for hook in hooks:
        acts = cache[hook].reshape(-1, tm.model.cfg.d_model)
        varying = (acts.std(0) > 1e-6).nonzero()[:, 0].tolist()
        found: list[list[int]] = []
        for label in varying:
            for group in found:
                if (acts[:, group[0]] - acts[:, label]).abs().max() < 1e-6:
                    group.append(label)
                    break
            else:
                found.append([label])
        groups[hook] = found
    return groups


def _group_cosines(tm: TracrModel, sae, groups: list[list[int]]) -> torch.Tensor:
    """``[d_sae, groups]`` |cosine| of each decoder row with each group's direction (normalised sum)."""
    targets = torch.zeros(len(groups), tm.model.cfg.d_model)
    for index, group in enumerate(groups):
        targets[index, group] = 1.0 / len(group) ** 0.5
    rows = sae.W_dec.detach()
    return ((rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ targets.T).abs()


def label_recovery(tm: TracrModel, saes: list) -> dict[str, float]:
    """For every group of labels that varies at a site: the best |cosine| of an SAE decoder row with it."""
    groups = _label_groups(tm, [sae.cfg.hook_in for sae in saes])
    best = torch.cat([_group_cosines(tm, sae, groups[sae.cfg.hook_in]).max(0).values for sae in saes])
    return {"directions": float(best.numel()), "mean_cosine": float(best.mean()), "min_cosine": float(best.min()),
            "recovered_0.9": float((best >= 0.9).float().mean())}


def feature_truth_units(tm: TracrModel, graph: Any, node_scores: torch.Tensor,
                        min_cosine: float = 0.7) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Units and their ``(names, scores, truth)`` for a feature graph (``positions="sum"``) built on a
    ReplacementModel of ``tm.model`` with :func:`train_residual_saes`' SAEs.

    Units: every varying label group at every SAE site (``tokens:BOS``, the compiler's attention sink, is
    left out like the constant ``one``), and every MLP (its bare-site error node). A group at
    ``resid_pre{L}`` is in the true circuit when a head or MLP of layer ``L`` or later reads one of its
    labels, or it holds the program's output; at the final ``resid_post`` only the output counts. A
    group scores the largest |score| among features whose decoder row has |cosine| >= ``min_cosine``
    with it; an MLP scores its error node.
    """
    rw = tm._reads_writes()
    n_layers = tm.model.cfg.n_layers
    output = {i for i, label in enumerate(tm.residual_labels) if variable_of(label) == tm.output_label}
    read_from: dict[int, set[int]] = {}
    later = set(output)
    for layer in reversed(range(n_layers)):
        for name, (reads, _) in rw.items():
            if name.startswith(f"L{layer}."):
                later |= set(reads.nonzero()[:, 0].tolist())
        read_from[layer] = set(later)
    sae_sites = [site for site in graph.rm.sites if site.dictionary is not None]
    groups = _label_groups(tm, [site.hook_in for site in sae_sites])
    bos = tm.residual_labels.index("tokens:BOS") if "tokens:BOS" in tm.residual_labels else -1
    names, scores, truth = [], [], []
    node_index = {node_id: i for i, node_id in enumerate(graph.node_ids)}
    magnitudes = node_scores.abs()
    for site in graph.rm.sites:
        if site.dictionary is None:
            names.append(f"{site.name}:error")
            index = node_index.get(f"{site.name}:error")
            scores.append(float(magnitudes[index]) if index is not None else 0.0)  # no node: output never changes
            truth.append(bool(rw[f"L{site.layer}.MLP"][1].any()))
            continue
        site_groups = [g for g in groups[site.hook_in] if g != [bos]]
        cosine = _group_cosines(tm, site.dictionary, site_groups)  # [d_sae, groups]
        best = torch.zeros(len(site_groups))
        for feature in range(cosine.shape[0]):
            index = node_index.get(f"{site.name}:{feature}")
            if index is not None:
                members = cosine[feature] >= min_cosine
                best[members] = torch.maximum(best[members], magnitudes[index])
        positives = output if site.hook_out.endswith("resid_post") else read_from[site.layer]
        for group, score in zip(site_groups, best.tolist(), strict=True):
            names.append(f"{site.name}:" + "+".join(tm.residual_labels[i] for i in group))
            scores.append(score)
            truth.append(any(i in positives for i in group))
    return names, torch.tensor(scores), torch.tensor(truth)

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


def _inputs(tm: TracrModel, count: int, seed: int) -> list[list]:
    vocab = sorted((v for v in tm.input_encoding if v not in ("BOS", "compiler_pad")), key=str)
    rng = random.Random(seed)
    n = tm.model.cfg.n_ctx - 1
    return [[rng.choice(vocab) for _ in range(n)] for _ in range(count)]


def tracr_task(tm: TracrModel, n_pairs: int = 8, seed: int = 0) -> ContrastiveTask:
    """Clean/corrupt pairs of random full-length inputs; the answer is the clean output at the last position
    (its logit is the metric; a numerical output has one logit, the value itself)."""
    from tracr.rasp import rasp

    pairs, attempts = [], 0
    for clean, corrupt in zip(_inputs(tm, 50 * n_pairs, seed), _inputs(tm, 50 * n_pairs, seed + 1), strict=True):
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


def _assignments(tm: TracrModel, sae) -> list[set[str]]:
    """Per feature, the labels its decoder row points along (coordinates >= half its largest one, which
    itself must carry a quarter of the row's squared norm). Perfectly correlated labels (such as a token
    and a map of that token) share one feature, which then belongs to both."""
    rows = sae.W_dec.detach().abs()
    largest = rows.max(-1, keepdim=True).values
    significant = (rows >= 0.5 * largest) & (largest.pow(2) >= 0.25 * rows.pow(2).sum(-1, keepdim=True))
    return [{tm.residual_labels[i] for i in row.nonzero()[:, 0].tolist()} for row in significant]


def label_recovery(tm: TracrModel, saes: list) -> dict[str, float]:
    """For every label that varies at a site: the best |cosine| of an SAE decoder row with its direction.

    Labels with identical activations over the data (a token and a map that copies it) cannot be told
    apart by any dictionary; their direction is taken as the normalised sum of the group's directions.
    """
    tokens = torch.tensor([tm.encode(x) for x in _inputs(tm, 256, 99)])
    with torch.no_grad():
        _, cache = tm.model.run_with_cache(tokens, names_filter=[s.cfg.hook_in for s in saes])
    best = []
    for sae in saes:
        acts = cache[sae.cfg.hook_in].reshape(-1, tm.model.cfg.d_model)
        varying = (acts.std(0) > 1e-6).nonzero()[:, 0]
        columns = acts[:, varying].T  # [labels, rows]
        same = (columns[:, None, :] - columns[None, :, :]).abs().amax(-1) < 1e-6  # [labels, labels]
        targets = torch.zeros(len(varying), acts.shape[1])
        targets[:, varying] = same.float()
        targets = targets / targets.norm(dim=-1, keepdim=True)
        rows = sae.W_dec.detach()
        cosine = (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ targets.T  # [d_sae, labels]
        best.append(cosine.max(0).values)
    best = torch.cat(best)
    return {"labels": float(best.numel()), "mean_cosine": float(best.mean()), "min_cosine": float(best.min()),
            "recovered_0.9": float((best >= 0.9).float().mean())}


def feature_truth_units(tm: TracrModel, graph: Any, node_scores: torch.Tensor) -> tuple[list[str], torch.Tensor,
                                                                                        torch.Tensor]:
    """Units ``(site, variable)`` and MLP error nodes: ``(names, scores, truth)`` for a feature graph built
    with ``positions="sum"`` on a ReplacementModel of ``tm.model`` with :func:`train_residual_saes`' SAEs."""
    rw = tm._reads_writes()
    n_layers = tm.model.cfg.n_layers
    read_from = {}  # layer -> variables read by a component of that layer or later
    later: set[str] = {tm.output_label}
    for layer in reversed(range(n_layers)):
        for name, (reads, _) in rw.items():
            if name.startswith(f"L{layer}."):
                later |= {variable_of(tm.residual_labels[i]) for i in reads.nonzero()[:, 0].tolist()}
        read_from[layer] = set(later)
    variables = sorted({variable_of(label) for label in tm.residual_labels} - {"one"})
    site_labels = {site.name: _assignments(tm, site.dictionary) for site in graph.rm.sites if site.dictionary}
    scores: dict[tuple[str, str], float] = {}
    truth: dict[tuple[str, str], bool] = {}
    for site in graph.rm.sites:
        if site.dictionary is None:
            scores[(site.name, "error")] = 0.0  # an MLP whose output never changes has no error node
            truth[(site.name, "error")] = bool(rw[f"L{site.layer}.MLP"][1].any())
            continue
        layer = site.layer
        positives = {tm.output_label} if site.hook_out.endswith("resid_post") else read_from[layer]
        for variable in variables:
            scores[(site.name, variable)] = 0.0
            truth[(site.name, variable)] = variable in positives
    for node_id, score in zip(graph.node_ids, node_scores.abs().tolist(), strict=True):
        site, what = node_id.split(":")
        if what == "error":
            if site.startswith("mlp"):
                scores[(site, "error")] = score
                truth[(site, "error")] = bool(rw[f"L{site[3:]}.MLP"][1].any())
            continue
        for variable in {variable_of(label) for label in site_labels[site][int(what)]} - {"one"}:
            scores[(site, variable)] = max(scores[(site, variable)], score)
    names = sorted(scores)
    return ([f"{s}:{v}" for s, v in names], torch.tensor([scores[k] for k in names]),
            torch.tensor([truth[k] for k in names]))

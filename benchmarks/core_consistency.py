"""Do the engines agree with the model and with each other? Soft caps, q/k norms, mean ablation.

On tiny config-built models (tests/conftest.py's shapes), with random ReLU transcoders at every layer:

* a Llama-style model whose output logits are soft-capped at 2 (unembedding scaled so that the cap bites):
  the largest difference between the replacement model's logits (every site through its features plus
  error) and the model's own; the unablated replacement model's KL from the model on a task; the task's
  full-model logit difference through feature nodes and through component nodes;
* the same model with q/k norms (Qwen3-style): whether a batched frozen run works, and ``verify``'s error;
* mean ablation of every MLP on prompts of unequal length, through component nodes, through feature (error)
  nodes, and by a hand-written hook (per position, the mean over the prompts that reach it).

Runs against whichever featcircuits is importable, so the same file measures an older checkout too:

    python benchmarks/core_consistency.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY_LLAMA_CONFIG, mean_ablated_mlps_by_hand, prefix_sharing_task  # noqa: E402

import featcircuits  # noqa: E402
from featcircuits import Dictionary, DictionaryConfig, load_model  # noqa: E402
from featcircuits.circuits import ComponentGraph, FeatureGraph  # noqa: E402
from featcircuits.graph import ReplacementModel, build_graph, verify  # noqa: E402

PROMPT = [1, 17, 33, 5, 60, 2, 41, 9, 88, 12]


def transcoders(model) -> list[Dictionary]:
    torch.manual_seed(0)
    out = []
    for layer in range(model.cfg.n_layers):
        d = Dictionary.from_config(DictionaryConfig(
            d_in=model.cfg.d_model, d_sae=48, kind="transcoder", activation="relu",
            hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out"))
        with torch.no_grad():
            d.b_enc.fill_(-0.2)
        out.append(d)
    return out


def soft_cap() -> str:
    model = load_model({**TINY_LLAMA_CONFIG, "output_logits_soft_cap": 2.0}, seed=0)
    with torch.no_grad():
        model.unembed.W_U.mul_(30.0)
    rm = ReplacementModel(model, transcoders(model))
    task = prefix_sharing_task(model)
    with torch.no_grad():
        spliced = {s.name: (lambda e: e) for s in rm.sites}
        diff = float((rm.run(PROMPT, errors=spliced).logits[0] - model(torch.tensor([PROMPT]))[0]).abs().max())
        kl = FeatureGraph(rm, task, metric="kl").full_metric
        features = FeatureGraph(rm, task).full_metric
        components = ComponentGraph(model, task).full_metric
    return (f"soft_cap: replacement_logits_diff={diff:.3g} unablated_kl={kl:.3g} "
            f"full_metric_features={features:.4f} full_metric_components={components:.4f}")


def qk_norm() -> str:
    model = load_model({**TINY_LLAMA_CONFIG, "use_qk_norm": True}, seed=1)
    rm = ReplacementModel(model, transcoders(model))
    try:
        with torch.no_grad():
            rm.run(PROMPT, clean=rm.clean_run(PROMPT), batch_size=3)
        graph = build_graph(rm, prompt=PROMPT, progress=False, batch_size=16)
        return f"qk_norm: batched_frozen_run=ok verify_max_rel_error={verify(graph, n_sources=24).max_rel_error:.3g}"
    except Exception as err:  # the figure is whether it runs
        return f"qk_norm: batched_frozen_run=failed ({type(err).__name__}: {str(err)[:80]})"


@torch.no_grad()
def mean_ablation() -> str:
    model = load_model(TINY_LLAMA_CONFIG, seed=0)
    task = prefix_sharing_task(model)  # lengths 9, 7, 9, 8
    by_hand = mean_ablated_mlps_by_hand(model, task)  # tests/conftest.py: hooks on the plain model
    components = ComponentGraph(model, task, ablation="mean")
    keep = torch.tensor([[0.0 if node.endswith(".MLP") else 1.0 for node in components.node_ids]])
    features = FeatureGraph(ReplacementModel(model, []), task, ablation="mean", positions="sum")
    return (f"mean_ablation_all_mlps: by_hand={by_hand:.4f} "
            f"components={float(components.node_metric(keep)[0]):.4f} "
            f"features={float(features.node_metric(torch.zeros(1, len(features.node_ids)))[0]):.4f}")


def main() -> None:
    torch.set_num_threads(1)
    print(f"featcircuits at {Path(featcircuits.__file__).parent}")
    for line in (soft_cap(), qk_norm(), mean_ablation()):
        print(line)


if __name__ == "__main__":
    main()

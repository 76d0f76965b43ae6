"""Dataset-level attribution graphs for contrastive tasks: the mean graph over a set of prompts.

Each prompt gets its own exact graph whose single target is ``logit[answer] - logit[distractor]`` at its
last token. Positions are aligned at the end (node positions become negative: ``-1`` is every prompt's
last token), nodes are matched by id across prompts, and edge weights and activations are averaged over
the prompts (a node absent from a prompt counts as zero there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..circuits.tasks import ContrastiveTask, continuation_token
from .attribution import _as_replacement, build_graph
from .attribution_graph import AttributionGraph, graph_provenance
from .targets import Target, logit_diff_target

__all__ = ["build_dataset_graph"]

TASK_TARGET = "answer-distractor"


def _token_id(model, prompt: Any, token: int | str, what: str) -> int:
    """A token id, or the one token the text ``token`` adds after ``prompt`` (tokenised in context)."""
    if isinstance(token, str):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        return continuation_token(model, prompt, token, what)
    return int(token)


def _from_task(task: ContrastiveTask) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """A task's clean prompts (token ids, without their right padding) with its answer and distractor ids."""
    if task.distractors is None:
        raise ValueError(
            "The task has no distractors, but a dataset graph's target is logit[answer] - logit[distractor]; "
            "give every pair a distractor, or build single-prompt graphs with logit targets (build_graph)."
        )
    prompts = [task.clean_tokens[i, : int(last) + 1] for i, last in enumerate(task.clean_last.tolist())]
    return prompts, [int(t) for t in task.answers.tolist()], [int(t) for t in task.distractors.tolist()]


def build_dataset_graph(
    model,
    dictionaries: Sequence | ContrastiveTask | None = None,
    prompts: ContrastiveTask | Sequence[str | torch.Tensor | Sequence[int]] = (),
    answers: Sequence[int | str] = (),
    distractors: Sequence[int | str] = (),
    *,
    memory_budget_gb: float = 4.0,
    progress: bool = True,
    **graph_kwargs,
) -> AttributionGraph:
    """Mean attribution graph over ``prompts``, target ``logit[answer_i] - logit[distractor_i]``.

    ``prompts`` is a :class:`~featcircuits.circuits.tasks.ContrastiveTask` (its clean prompts, answers and
    distractors; then give no ``answers`` / ``distractors``) or a list of prompts (text or token ids) with
    one answer and one distractor each (token ids, or text tokenised after its prompt as tasks do). With a
    ReplacementModel the task may be the second argument: ``build_dataset_graph(rm, task)``.
    ``graph_kwargs`` go to :func:`build_graph` (``max_feature_nodes``, ``batch_size``). The result has
    no model attached (``verify`` the per-prompt graphs instead) and ``n_prompts`` set.
    """
    if isinstance(dictionaries, ContrastiveTask) and not len(prompts):
        prompts, dictionaries = dictionaries, None
    if isinstance(prompts, ContrastiveTask):
        if len(answers) or len(distractors):
            raise ValueError("A ContrastiveTask carries its own answers and distractors; do not also pass "
                             "answers= or distractors=.")
        prompts, answers, distractors = _from_task(prompts)
    if not len(prompts):
        raise ValueError("build_dataset_graph needs at least one prompt.")
    if not len(prompts) == len(answers) == len(distractors):
        raise ValueError(
            f"Give one answer and one distractor per prompt: {len(prompts)} prompts, {len(answers)} answers, "
            f"{len(distractors)} distractors."
        )
    if isinstance(dictionaries, ContrastiveTask):
        raise ValueError("Give the task once: build_dataset_graph(rm, task) or build_dataset_graph(model, "
                         "dictionaries, task).")
    rm = _as_replacement(model, dictionaries)
    graphs: list[AttributionGraph] = []
    for index, (prompt, answer, distractor) in enumerate(zip(prompts, answers, distractors, strict=True)):
        target = logit_diff_target(rm.model, _token_id(rm.model, prompt, answer, f"prompt {index} answer"),
                                   _token_id(rm.model, prompt, distractor, f"prompt {index} distractor"),
                                   name=TASK_TARGET)
        graph = build_graph(rm, prompt=prompt, targets=[target], memory_budget_gb=memory_budget_gb,
                            progress=progress, **graph_kwargs)
        aligned = graph.node_keys.clone()
        aligned[:, 2] -= graph.clean.n_pos  # positions counted from the end
        graph.node_keys = aligned
        graphs.append(graph)

    union, inverse = torch.unique(torch.cat([g.node_keys for g in graphs]), dim=0, return_inverse=True)
    n_union = union.shape[0]
    if n_union * n_union * 4 > memory_budget_gb * 2**30:
        raise ValueError(
            f"The mean graph has {n_union} distinct nodes ({n_union**2 * 4 / 2**30:.2f} GiB dense) but "
            f"memory_budget_gb={memory_budget_gb}; lower max_feature_nodes or use fewer prompts."
        )
    device = graphs[0].adjacency.device
    adjacency = torch.zeros(n_union, n_union, device=device)
    activations = torch.zeros(n_union, device=device)
    offset = 0
    for graph in graphs:
        index = inverse[offset:offset + graph.n_nodes]
        offset += graph.n_nodes
        adjacency.index_put_((index[:, None], index[None, :]), graph.adjacency, accumulate=True)
        activations.index_add_(0, index, graph.activations)
    directions = torch.stack([g.targets[0].vector for g in graphs]).mean(dim=0)
    target = Target(TASK_TARGET, directions, sum(g.targets[0].bias for g in graphs) / len(graphs), pos=-1)
    return AttributionGraph(
        node_keys=union, adjacency=adjacency / len(graphs), activations=activations / len(graphs),
        sites=graphs[0].sites, targets=[target], tokens=None,
        prompt=f"mean over {len(graphs)} prompts", n_active_features=max(g.n_active_features for g in graphs),
        n_prompts=len(graphs), provenance=graph_provenance(rm, targets=[target]),
    )

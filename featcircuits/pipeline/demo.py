"""``run_demo``: the whole pipeline in one call, on the bundled model or any model and dictionary set.

Load a model and its dictionaries (checked to fit each other), build the exact attribution graph of a
prompt, find a feature circuit for a contrastive task (attribution patching by default), measure its
faithfulness and completeness by ablation, describe its top features by the tokens their decoders
promote (through the unembedding) and the tokens they fire on in a small text, and write an HTML report
(the viz viewer for the graph and for the circuit, with feature cards). ``featcircuits demo`` is the
command-line face of this function.

Built-in tasks (``task=`` a name; a JSON file or a list of pairs works too, see ``circuits.tasks``):

* ``docstring``: the bundled model's docstring task (``featcircuits/pretrained/bundled/docstring_task.json``).
* ``forwarding``: the bundled model's argument-forwarding task
  (``featcircuits/pretrained/bundled/forwarding_task.json``): a method passes its arguments on in order and
  the model names the next one.
* ``names``: repeat a story character's name seen earlier (TinyStories-style prompts; the names that are
  one token in the model's vocabulary), corrupted by swapping the name.
* ``induction``: a random token sequence repeated; the corrupt run changes the token to be copied.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._resources import pretrained_path
from .explanation import Explanation, explain_graph
from .report import FeatureSummary, feature_summaries, token_strings, write_report

__all__ = ["run_demo", "DemoResult", "FeatureSummary", "BundledMissingError", "builtin_task_pairs",
           "BUNDLED_DIR", "BUILTIN_TASKS"]

# The bundled model, its dictionaries and tasks: package data (featcircuits/pretrained/bundled in a checkout).
BUNDLED_DIR = pretrained_path("bundled")
# Where the recipes in train/ (run from the repository root) write the bundled files.
BUNDLED_RECIPE_DIR = "featcircuits/pretrained/bundled"
BUILTIN_TASKS = ("docstring", "forwarding", "names", "induction")
# Bundled dictionaries: the first of these (relative to BUNDLED_DIR) that exists.
_BUNDLED_DICTIONARY_DIRS = ("transcoders", "dictionaries")
# The bundled model's task files, in order of preference for the default task (each holds only pairs
# the model gets right; train.bundled_model.eval_tasks --write-task writes them).
_BUNDLED_TASKS = {"docstring": "docstring_task.json", "forwarding": "forwarding_task.json"}


def _bundled_default_task() -> str | None:
    return next((name for name, file in _BUNDLED_TASKS.items() if (BUNDLED_DIR / file).is_file()), None)


# The demo's circuit: AtP's selection, or, when that explains less than this fraction of the metric, the
# smallest swept top-k that explains at least this much.
DEMO_FAITHFULNESS = 0.8

_NAME_PREFIX = "Once upon a time, there was a little dog named"
_NAME_TEMPLATE = _NAME_PREFIX + " {name}. {name} liked to play with the ball. One day,"
_STORY_NAMES = ("Tim", "Lily", "Timmy", "Tom", "Sue", "Ben", "Sam", "Max", "Mia", "Anna", "Lucy", "Jack")


class BundledMissingError(FileNotFoundError):
    """``featcircuits demo`` without arguments found no bundled model or dictionaries."""


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote; ``report`` is the HTML page to open."""

    report: Path
    prompt: str
    task_name: str
    graph: Any
    circuit: Any
    evaluation: dict[str, Any]
    replacement_score: float
    graph_completeness: float
    top_features: list[FeatureSummary]
    top_predictions: list[tuple[str, float]]
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    explanation: Explanation | None = None  # labelled supernodes, measured effects, a steering example

    @property
    def faithfulness(self) -> float:
        return float(self.evaluation["faithfulness"])

    @property
    def completeness(self) -> float:
        return float(self.evaluation["completeness"])


# ---- inputs ------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (as the recipes write it)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _bundled_release() -> str | None:
    """A registry release of transcoders shipped inside BUNDLED_DIR (``local_dir``), if the registry has one."""
    from ..hub.registry import get_release, list_releases

    for name in list_releases(include_saelens=False):
        release = get_release(name)
        if release.local_dir is not None and release.kind == "transcoder" and release.dictionaries and \
                BUNDLED_DIR.resolve() in (release.local_dir.resolve(), *release.local_dir.resolve().parents):
            return name
    return None


def _bundled_inputs() -> tuple[Path, Path | str, Path]:
    """The bundled model dir, dictionary dir and task file; BundledMissingError naming what is missing."""
    missing = []
    if not (BUNDLED_DIR / "config.json").is_file():
        missing.append(f"the bundled model ({_shown(BUNDLED_DIR / 'config.json')})")
    dictionaries = next((BUNDLED_DIR / d for d in _BUNDLED_DICTIONARY_DIRS if (BUNDLED_DIR / d).is_dir()), None)
    dictionaries = dictionaries or _bundled_release()
    if dictionaries is None:
        missing.append(f"its dictionaries ({' or '.join(_shown(BUNDLED_DIR / d) for d in _BUNDLED_DICTIONARY_DIRS)}, "
                       "or a transcoder release in featcircuits/pretrained/registry.yaml with its local_dir there)")
    default_task = _bundled_default_task()
    if default_task is None:
        missing.append("its task (" + " or ".join(_shown(BUNDLED_DIR / f) for f in _BUNDLED_TASKS.values()) + ")")
    if missing:
        recipe_dir = BUNDLED_RECIPE_DIR
        raise BundledMissingError(
            "featcircuits demo without --model/--dictionaries runs on the bundled model, but this installation lacks "
            + "; ".join(missing) + ". Produce them from a checkout, at its root, with the recipes in train/ "
            "(see train/README.md):\n"
            "  python -m train.bundled_model.build_corpus --out runs/bundled_corpus\n"
            f"  python -m train.bundled_model.train_tokenizer --corpus runs/bundled_corpus --out {recipe_dir}\n"
            f"  python -m train.bundled_model.eval_tasks --write-names --corpus runs/bundled_corpus --model {recipe_dir}\n"
            f"  python -m train.bundled_model.train_model --out {recipe_dir} --corpus runs/bundled_corpus "
            "--work runs/bundled_run --steps 4000 --warmup 150\n"
            f"  python -m train.bundled_model.eval_tasks --model {recipe_dir} --task forwarding --write-task "
            f"{recipe_dir}/forwarding_task.json\n"
            "  featcircuits train train/bundled_transcoders.yaml, then copy runs/bundled_transcoders/{blocks.*,metrics.json} "
            f"into {recipe_dir}/transcoders\n"
            "or run on any model: featcircuits demo --model MODEL_DIR --dictionaries DICT_DIR [--prompt TEXT]."
        )
    return BUNDLED_DIR, dictionaries, BUNDLED_DIR / _BUNDLED_TASKS[default_task]  # type: ignore[return-value]


def _continuation_token(model: Any, prefix: str, word: str) -> int | None:
    """The one token ``word`` adds after ``prefix`` (None when it adds several or changes the prefix)."""
    before = model.to_tokens(prefix)[0].tolist()
    after = model.to_tokens(f"{prefix} {word}")[0].tolist()
    if len(after) != len(before) + 1 or after[: len(before)] != before:
        return None
    return int(after[-1])


def _names_pairs(model: Any) -> list[dict[str, Any]]:
    if getattr(model, "tokenizer", None) is None:
        return []
    prompts = {n: _NAME_TEMPLATE.format(name=n) for n in _STORY_NAMES}
    answers = {n: _continuation_token(model, _NAME_PREFIX, n) for n in prompts}
    usable = [n for n in _STORY_NAMES if answers[n] is not None]
    lengths = {n: model.to_tokens(prompts[n]).shape[1] for n in usable}
    return [{"clean": prompts[a], "corrupt": prompts[b], "answer": answers[a], "distractor": answers[b]}
            for a in usable for b in usable if a != b and lengths[a] == lengths[b]]


def _induction_pairs(model: Any, n_pairs: int = 8, length: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """``BOS s s[:k]`` answers ``s[k]``; the corrupt prompt replaces ``s[k]`` in the first copy."""
    rng = random.Random(seed)
    d_vocab = model.cfg.d_vocab
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    low = min(d_vocab - 2 * length, 3 if d_vocab > 64 else 0)
    pool = [t for t in range(low, d_vocab) if t not in special]
    pairs = []
    for _ in range(n_pairs):
        sequence = rng.sample(pool, length + 1)
        k = length // 2
        clean = sequence[:length] + sequence[:k]
        corrupt = list(clean)
        corrupt[k] = sequence[length]  # a token not in the sequence
        prefix = [bos] if bos is not None else []
        pairs.append({"clean": prefix + clean, "corrupt": prefix + corrupt, "answer": sequence[k],
                      "distractor": sequence[length]})
    return pairs


def builtin_task_pairs(name: str, model: Any) -> list[dict[str, Any]]:
    """Pairs of a built-in task (see the module docstring) for ``model``."""
    if name in _BUNDLED_TASKS:
        task_file = BUNDLED_DIR / _BUNDLED_TASKS[name]
        if not task_file.is_file():
            raise FileNotFoundError(f"No {name} task at {task_file}; write it with `python -m train.bundled_model."
                                    f"eval_tasks --model {BUNDLED_RECIPE_DIR} --task {name} --write-task {task_file}`.")
        data = json.loads(task_file.read_text())
        return data["pairs"] if isinstance(data, dict) else data
    if name == "names":
        pairs = _names_pairs(model)
        if not pairs:
            raise ValueError("The 'names' task needs two story names that are single tokens in this model's "
                             f"vocabulary (tried {list(_STORY_NAMES)}); use --task induction or a task file.")
        return pairs
    if name == "induction":
        return _induction_pairs(model)
    raise ValueError(f"Unknown built-in task {name!r}; choose one of {BUILTIN_TASKS} or give a task JSON file.")


def _resolve_task(task: Any, model: Any, bundled: bool, max_pairs: int) -> tuple[str, Any]:
    """(name, ContrastiveTask) with at most ``max_pairs`` pairs (the first ones: every pair costs forwards)."""
    from ..circuits import ContrastiveTask, load_task

    if isinstance(task, ContrastiveTask):
        return "custom", task
    if isinstance(task, (list, tuple)):
        return "custom", ContrastiveTask.from_pairs(model, list(task)[:max_pairs])
    if task is None:
        default = _bundled_default_task() if bundled else None
        task = default or ("names" if _names_pairs(model) else "induction")
    if str(task) in BUILTIN_TASKS:
        pairs = builtin_task_pairs(str(task), model)[:max_pairs]
        return str(task), ContrastiveTask.from_pairs(model, pairs, source=f"task {task}")
    loaded = load_task(task, model)
    n = max_pairs
    return Path(task).stem, ContrastiveTask(
        loaded.clean_tokens[:n], loaded.corrupt_tokens[:n], loaded.clean_last[:n], loaded.corrupt_last[:n],
        loaded.answers[:n], None if loaded.distractors is None else loaded.distractors[:n], loaded.pairs[:n])


# ---- the pipeline ------------------------------------------------------------------------------


class _Stages:
    """A progress bar over the pipeline's stages, with the time each one took."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="demo", disable=not enabled, leave=False)
        self.timings: dict[str, float] = {}

    def run(self, name: str, function, *args, **kwargs):
        self.bar.set_description(name)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.timings[name] = time.perf_counter() - start
        self.bar.update(1)
        return result

    def close(self) -> None:
        self.bar.close()


def _load_inputs(model: Any, dictionaries: Any, device: str) -> tuple[Any, list]:
    from ..dictionaries import Dictionary
    from ..hub.checks import check_dictionaries_match_model
    from ..hub.loading import load_dictionaries
    from ..models import load_model

    model = load_model(model, device=device) if isinstance(model, (str, Path)) else model
    if isinstance(dictionaries, (str, Path)):
        dictionaries = load_dictionaries(dictionaries, device=device)
    dictionaries = list(dictionaries)
    if not dictionaries or not all(isinstance(d, Dictionary) for d in dictionaries):
        raise ValueError("No dictionaries to splice in; give a directory of dictionaries (any supported format) "
                         "or a registry release.")
    check_dictionaries_match_model(model, dictionaries)
    return model, dictionaries


def _demo_text(model: Any, rm: Any, prompt: Any, task: Any, text: str | None) -> torch.Tensor:
    """``[n_seq, pos]`` tokens the feature cards are computed on: the prompt, the task's clean and corrupt
    prompts, and ``text`` (a user's file). Right-padded with BOS, which dashboards skip; the model is
    causal, so padding after a sequence changes nothing in it."""
    sequences = [rm.to_tokens(prompt)]
    for tokens, last in ((task.clean_tokens, task.clean_last), (task.corrupt_tokens, task.corrupt_last)):
        sequences += [row[: int(end) + 1] for row, end in zip(tokens, last, strict=True)]
    if text:
        ids = model.to_tokens(text, truncate=False)[0]
        sequences += list(ids.split(model.cfg.n_ctx))
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    pad = bos if bos is not None else 0
    return torch.nn.utils.rnn.pad_sequence([s.cpu() for s in sequences], batch_first=True, padding_value=pad)


def run_demo(
    model: Any = None,
    dictionaries: Any = None,
    prompt: str | list[int] | None = None,
    task: Any = None,
    out: str | Path = "featcircuits-demo",
    *,
    method: str = "atp",
    max_feature_nodes: int = 256,
    n_top: int = 8,
    max_pairs: int = 4,
    n_sizes: int = 8,
    text: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> DemoResult:
    """Graph, circuit, faithfulness, top features and an HTML report, in one call.

    Args:
        model: a checkpoint dir / TransformerLens name / ``HookedTransformer``; None for the bundled model.
        dictionaries: a directory (any supported format), a registry release, or a list of ``Dictionary``;
            None for the bundled transcoders. Checked against ``model`` before anything runs.
        prompt: text (or token ids) whose attribution graph is built; default the task's first clean prompt.
        task: a built-in task name (``BUILTIN_TASKS``), a task JSON file, a list of pairs or a
            ``ContrastiveTask``; default the bundled task (``docstring``, else ``forwarding``) on the bundled
            model, else ``names`` when the model
            knows the names, else ``induction``.
        out: directory for the report and its data files (created; earlier demo files are replaced).
        method: circuit discovery method (``atp``, ``ig``, ``acdc``).
        max_feature_nodes: feature nodes kept in the graph (the most influential).
        n_top: features described in the summary.
        max_pairs: task pairs used (the first ones); each costs a forward per ablation batch.
        n_sizes: circuit sizes in the faithfulness sweep (a log grid from 1 to every node).
        text: extra text for the feature cards' top activating contexts.
    """
    if (model is None) != (dictionaries is None):
        raise ValueError("Give both model and dictionaries (or neither, for the bundled model and its transcoders).")
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("The prompt is empty; give some text to attribute (or leave it out for the task's prompt).")
    if model is None:
        model, dictionaries, _ = _bundled_inputs()
    # the bundled model's default task is its own, however the model was named
    bundled = isinstance(model, (str, Path)) and Path(model).resolve() == BUNDLED_DIR.resolve()
    from ..circuits import evaluate, find_circuit, make_graph
    from ..graph import ReplacementModel, build_graph, graph_scores, parse_node_id
    from ..viz.dashboards import compute_dashboards

    stages = _Stages(["load", "graph", "task", "circuit", "evaluate", "cards", "explain", "report"], progress)
    try:
        model, dictionaries = stages.run("load", _load_inputs, model, dictionaries, device)
        rm = ReplacementModel(model, dictionaries)
        task_name, contrastive = _resolve_task(task, model, bundled, max_pairs)
        if prompt is None:
            prompt = contrastive.pairs[0]["clean"]
        graph = stages.run("graph", build_graph, rm, prompt=prompt, max_feature_nodes=max_feature_nodes,
                           progress=progress)
        scores = graph_scores(graph)
        feature_graph = stages.run("task", make_graph, rm, contrastive)
        circuit = stages.run("circuit", find_circuit, rm, contrastive, method, graph=feature_graph)
        n_units = len(circuit.node_ids)
        sizes = torch.logspace(0, torch.log10(torch.tensor(float(max(n_units, 1)))), n_sizes).round().long()
        sweep = sorted({0, n_units, *sizes.tolist()})
        evaluation = stages.run("evaluate", evaluate, circuit, sizes=sweep)
        if method != "acdc" and evaluation["faithfulness"] < DEMO_FAITHFULNESS:
            # The score threshold picked too few units to explain the task: take instead the smallest
            # size of the sweep whose top-scored units reach DEMO_FAITHFULNESS (the same ranking).
            curve = evaluation["curve"]
            enough = [size for size, f in zip(curve["sizes"], curve["faithfulness"], strict=True)
                      if size > 0 and f >= DEMO_FAITHFULNESS]
            if enough and min(enough) < n_units:
                grown = circuit.top_k(min(enough))
                grown.graph = circuit.graph
                circuit = grown
                evaluation = evaluate(circuit, sizes=sweep)

        # feature cards for every feature the two viewers show
        wanted: dict[str, set[int]] = {}
        layer_of = {s.name: s.dictionary.cfg.layer for s in rm.sites if s.dictionary is not None}
        for node_id in list(circuit.nodes) + graph.node_ids:
            node = parse_node_id(node_id)
            if node.kind == "feature":
                wanted.setdefault(str(layer_of[node.site]), set()).add(int(node.feature))
        by_layer: dict[str, Any] = {}
        for site in rm.sites:  # one dictionary per layer key (the viewer's card key is layer_feature)
            if site.dictionary is not None:
                by_layer.setdefault(str(site.dictionary.cfg.layer), site.dictionary)
        tokens = _demo_text(model, rm, prompt, contrastive, text)
        dashboards = stages.run("cards", compute_dashboards, model, by_layer, tokens.to(model.cfg.device),
                                batch_size=64,
                                features={k: sorted(v) for k, v in wanted.items() if k in by_layer})
        top = feature_summaries(model, rm, circuit, dashboards, n_top, n_tokens=5)
        explanation = stages.run("explain", explain_graph, graph, dashboards, prompt)

        probs = graph.clean.logits[-1].float().softmax(-1)
        top_p, top_i = probs.topk(5)
        predictions = list(zip(token_strings(model, top_i.tolist()), top_p.tolist(), strict=True))
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory for the report.")
        out.mkdir(parents=True, exist_ok=True)
        files = stages.run("report", write_report, out, graph, circuit, dashboards, model, rm, prompt, task_name,
                           evaluation, scores, top, predictions, explanation)
    finally:
        stages.close()
    prompt_text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return DemoResult(report=files["report"], prompt=prompt_text, task_name=task_name, graph=graph, circuit=circuit,
                      evaluation=evaluation, replacement_score=scores.replacement_score,
                      graph_completeness=scores.completeness_score, top_features=top, top_predictions=predictions,
                      files=files, timings=stages.timings, explanation=explanation)

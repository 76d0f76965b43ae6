"""The README.md (model card) uploaded with a set of dictionaries.

YAML front matter (library_name, base_model, tags) that the Hub indexes, then a table per dictionary:
shape, hooks, L0, FVU, CE loss recovered, dead fraction, training tokens and provenance. Metrics come
from the ``metrics.json`` that ``featcircuits train --out`` writes; a metric it lacks reads "not measured".
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from ..dictionaries.base import Dictionary

__all__ = ["render_model_card", "metrics_for"]

NOT_MEASURED = "not measured"
# metrics.json key -> row label
_METRIC_ROWS = (
    ("l0", "L0 (mean active features per token)"),
    ("fvu", "FVU (fraction of variance unexplained)"),
    ("ce_loss_recovered", "CE loss recovered"),
    ("dead_fraction", "Dead fraction"),
)


def metrics_for(name: str, metrics: dict[str, Any] | None, n_dictionaries: int) -> dict[str, Any]:
    """This dictionary's metrics: its entry under ``metrics["dictionaries"]``, else the run's top-level
    figures when the run trained only this one dictionary, else nothing."""
    if not metrics:
        return {}
    per_dictionary = metrics.get("dictionaries") or {}
    if name in per_dictionary:
        return dict(per_dictionary[name])
    if n_dictionaries == 1:
        return {key: value for key, value in metrics.items() if not isinstance(value, dict | list)}
    return {}


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_MEASURED
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _architecture(dictionary: Dictionary) -> str:
    cfg = dictionary.cfg
    k = f" (k={cfg.k})" if cfg.k else ""
    return f"{cfg.kind.replace('_', ' ')}, {cfg.activation}{k}"


def render_model_card(
    repo_id: str,
    dictionaries: dict[str, Dictionary],
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    version: str = "",
    files: dict[str, dict[str, str]] | None = None,
) -> str:
    """Markdown model card for ``dictionaries`` (name -> Dictionary) as published in ``repo_id``.

    ``files`` maps each dictionary name to ``{layout label: folder in the repo}``, e.g.
    ``{"native": "native/blocks.0.hook_resid_pre", "SAELens": "saelens/blocks.0.hook_resid_pre"}``.
    """
    files = files or {name: {"native": f"native/{name}"} for name in dictionaries}
    saelens_names = [name for name in dictionaries if "SAELens" in files.get(name, {})]
    kinds = {d.cfg.kind for d in dictionaries.values()}
    tags = ["featcircuits", "mechanistic-interpretability", "sparse-dictionary"]
    tags += sorted({"sae": "sparse-autoencoder", "transcoder": "transcoder", "skip_transcoder": "transcoder"}[k]
                   for k in kinds)
    if saelens_names:
        tags.append("saelens")
    front: dict[str, Any] = {"library_name": "featcircuits"}
    if base_model:
        front["base_model"] = base_model
    front["tags"] = tags
    models = sorted({d.cfg.model_name for d in dictionaries.values() if d.cfg.model_name}) or ["an unnamed model"]
    name = repo_id.split("/")[-1]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{len(dictionaries)} sparse dictionar{'y' if len(dictionaries) == 1 else 'ies'} "
        f"({', '.join(sorted(kinds))}) for `{'`, `'.join(models)}`, published with featcircuits {version}.",
        "",
        "## Load",
        "",
        "```python",
        "import featcircuits as fc",
        "from huggingface_hub import snapshot_download",
        "",
        f'folder = snapshot_download("{repo_id}")',
        'dictionaries = fc.load_dictionaries(f"{folder}/native")',
        "```",
    ]
    if saelens_names:
        lines += [
            "",
            "With SAELens (every dictionary whose architecture sae-lens has is also stored in its layout):",
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f'sae = SAE.from_pretrained("{repo_id}", "{files[saelens_names[0]]["SAELens"]}")',
            "```",
        ]
    lines += ["", "## Dictionaries"]
    for dict_name, dictionary in dictionaries.items():
        cfg = dictionary.cfg
        measured = metrics_for(dict_name, metrics, len(dictionaries))
        tokens = cfg.training_tokens or measured.get("tokens")
        rows = [
            ("Architecture", _architecture(dictionary)),
            ("Shape (d_in → d_sae → d_out)", f"{cfg.d_in} → {cfg.d_sae} → {cfg.d_out}"),
            ("Hook in", f"`{cfg.hook_in}`" if cfg.hook_in else NOT_MEASURED),
            ("Hook out", f"`{cfg.hook_out}`" if cfg.hook_out else NOT_MEASURED),
            *[(label, _number(measured.get(key))) for key, label in _METRIC_ROWS],
            ("Training tokens", _number(tokens) if tokens else NOT_MEASURED),
            ("Model", cfg.model_name or "not recorded"),
            ("Model revision", cfg.model_revision or "not recorded"),
            ("Dataset", cfg.dataset or "not recorded"),
            ("featcircuits version", version or "not recorded"),
            ("Files", ", ".join(f"`{folder}/` ({label})" for label, folder in files.get(dict_name, {}).items())),
        ]
        if "SAELens" not in files.get(dict_name, {}):
            rows.append(("SAELens", f"not available: sae-lens has no {cfg.kind} with {cfg.activation} activation"))
        lines += ["", f"### {dict_name}", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in rows]
    lines += [
        "",
        "Metrics are those `featcircuits train` measured on held-out activations (metrics.json in this repo "
        "when present); \"not measured\" means the run did not record that figure.",
        "",
    ]
    return "\n".join(lines)

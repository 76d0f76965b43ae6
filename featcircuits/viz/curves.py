"""Faithfulness and completeness curves of circuits as plots (matplotlib).

The input is what :func:`featcircuits.circuits.evaluation.evaluate_circuit` returns (also stored as
``circuit.evaluation``): a ``curve`` with ``sizes`` (or ``fractions``), ``faithfulness`` and
``completeness`` lists. Several circuits (methods) can share one plot::

    plot_faithfulness_curves({"AtP": atp.evaluation, "ACDC": acdc.evaluation}, "curves.png")

Faithfulness of the top-k circuit rises to 1 as k grows (the circuit alone does the task); the
completeness curve, the faithfulness of the complement, falls to 0 (nothing outside matters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featcircuits.dictionaries.io.common import atomic_path

from .page import make_readable

__all__ = ["plot_faithfulness_curves", "curve_from_evaluation"]


def curve_from_evaluation(evaluation: Any) -> dict[str, list[float]]:
    """``{"x", "faithfulness", "completeness"}`` from an evaluation dict, a Circuit, or a bare curve dict.

    ``x`` is the circuit size (number of units) when known, else the fraction of units. Raises
    ``ValueError`` naming the problem for missing, empty, mismatched or non-finite lists.
    """
    if hasattr(evaluation, "evaluation") and not isinstance(evaluation, Mapping):
        evaluation = evaluation.evaluation
    if not isinstance(evaluation, Mapping):
        raise TypeError(f"Expected an evaluation dict (evaluate_circuit's result) or a Circuit, got "
                        f"{type(evaluation).__name__}.")
    curve = evaluation.get("curve", evaluation)
    if not curve:
        raise ValueError("This circuit has no evaluation curve yet; run featcircuits' evaluate_circuit first.")
    x = curve.get("sizes", curve.get("fractions"))
    faithfulness = curve.get("faithfulness")
    if x is None or faithfulness is None:
        raise ValueError("An evaluation curve needs 'sizes' (or 'fractions') and 'faithfulness' lists; got keys "
                         f"{sorted(curve)}.")
    completeness = curve.get("completeness")
    lists = {"x": list(x), "faithfulness": list(faithfulness)}
    if completeness is not None:
        lists["completeness"] = list(completeness)
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"Curve lists differ in length {lengths}; they must have one value per circuit size.")
    if lengths["x"] == 0:
        raise ValueError("The evaluation curve is empty (no circuit sizes); nothing to plot.")
    for name, values in lists.items():
        bad = [value for value in values if value is None or not math.isfinite(float(value))]
        if bad:
            raise ValueError(f"The curve's {name} holds non-finite values {bad[:3]}; the evaluation failed there.")
    return {name: [float(value) for value in values] for name, values in lists.items()}


def plot_faithfulness_curves(
    evaluations: Any,
    path: str | os.PathLike | None = None,
    title: str = "Circuit faithfulness and completeness",
    log_x: bool | None = None,
) -> Any:
    """Plot faithfulness (solid) and completeness (dashed) against circuit size; return the Figure.

    ``evaluations``: one evaluation / Circuit, or a mapping ``{label: evaluation}`` for several.
    ``path`` (.png, .svg or .pdf) saves the plot atomically. ``log_x`` defaults to a log axis when the
    sizes span more than two decades.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(evaluations, Mapping) and not ({"curve", "faithfulness"} & set(evaluations)):
        named = {str(label): curve_from_evaluation(value) for label, value in evaluations.items()}
    elif isinstance(evaluations, Sequence) and not isinstance(evaluations, (str, bytes)):
        named = {f"circuit {index}": curve_from_evaluation(value) for index, value in enumerate(evaluations)}
    else:
        named = {"circuit": curve_from_evaluation(evaluations)}
    if not named:
        raise ValueError("No evaluations to plot.")

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    positive_x = [value for curve in named.values() for value in curve["x"] if value > 0]
    if log_x is None:
        log_x = bool(positive_x) and max(positive_x) / min(positive_x) > 100
    for index, (label, curve) in enumerate(named.items()):
        colour = colours[index % len(colours)]
        x = curve["x"]
        if log_x:  # a log axis cannot show size 0; it is drawn at half the smallest size
            floor = min(positive_x) / 2
            x = [value if value > 0 else floor for value in x]
        axes.plot(x, curve["faithfulness"], color=colour, marker="o", markersize=3, label=f"{label} faithfulness",
                  gid=f"faithfulness:{label}")
        if "completeness" in curve:
            axes.plot(x, curve["completeness"], color=colour, linestyle="--", marker="s", markersize=3,
                      label=f"{label} completeness", gid=f"completeness:{label}")
    if log_x:
        axes.set_xscale("log")
    for level in (0.0, 1.0):
        axes.axhline(level, color="#999999", linewidth=0.8, zorder=0)
    axes.set_xlabel("circuit size (units kept)")
    axes.set_ylabel("fraction of the model's behaviour")
    axes.set_title(title)
    axes.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            plt.close(figure)
            raise ValueError(f"Cannot tell the image format of {path.name!r}; use .png, .svg or .pdf.")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=fmt, dpi=150)
            make_readable(tmp)
    return figure

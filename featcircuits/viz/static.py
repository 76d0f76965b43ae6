"""Static pictures of a graph or circuit: SVG/PNG/PDF through graphviz ``dot`` when installed, else matplotlib.

    render_graph_image("graph.json", "circuit.svg")            # engine="auto"
    render_graph_image(graph_json, "circuit.png", engine="matplotlib")

Both engines draw what the viewer draws: rows by layer (token embeddings at the bottom, logits on top),
edge width by |weight| and colour by sign (blue positive, red negative).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from featcircuits.dictionaries.io.common import atomic_path

from .graph_data import graph_payload, layout_positions, load_graph_json
from .page import make_readable

__all__ = ["render_graph_image", "graph_to_dot", "find_dot"]

POSITIVE, NEGATIVE = "#1f6feb", "#d1242f"
KIND_COLOURS = {"feature": "#f0883e", "error": "#8c959f", "embedding": "#57606a", "logit": "#2da44e",
                "component": "#8250df"}
FORMATS = ("svg", "png", "pdf")


def find_dot() -> str | None:
    """Path of graphviz's ``dot`` binary, or None."""
    return shutil.which("dot")


def _dot_string(text: str) -> str:
    # A DOT quoted string: backslash and double quote escaped; newlines kept as DOT line breaks.
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short(text: str, limit: int = 24) -> str:
    text = str(text).replace("\u2581", " ")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def graph_to_dot(payload: dict[str, Any]) -> str:
    """DOT source for a graph payload (:func:`featcircuits.viz.graph_data.graph_payload`).

    Each layer is one rank (``rank=same``) held in order by an invisible chain of row labels, so dot
    keeps the layer rows and only chooses the order within a row.
    """
    nodes, links, rows = payload["nodes"], payload["links"], payload["rows"]
    lines = ["digraph circuit {", "  rankdir=BT; newrank=true; nodesep=0.15; ranksep=0.5;",
             '  node [fontname="Helvetica", fontsize=8, shape=box, style="rounded,filled", color=white, '
             'margin="0.05,0.02", height=0.22, width=0.3];',
             '  edge [arrowsize=0.4];']
    title = payload.get("title") or ""
    lines.append(f'  label={_dot_string(title if nodes else "empty graph: no nodes")}; labelloc=t; fontname="Helvetica";')
    # Boxes sized to their labels: circles would grow to fit the text and swamp the picture.
    font_colours = {"feature": "black", "error": "white", "embedding": "white", "logit": "white", "component": "white"}
    by_row: dict[int, list[str]] = {}
    for index, node in enumerate(nodes):
        label = node["token"] if node["kind"] == "embedding" else node["label"]
        if node["kind"] == "embedding" and not str(label).strip():
            label = repr(label)  # whitespace-only tokens stay visible
        attributes = [f"label={_dot_string(_short(label))}", f"fontcolor={font_colours[node['kind']]}",
                      f"fillcolor={_dot_string(KIND_COLOURS[node['kind']])}", 'class="fc-node"',
                      f"tooltip={_dot_string(node['id'])}"]
        if node["kind"] in ("error", "embedding"):
            attributes.append('style="filled"')
        lines.append(f"  n{index} [{', '.join(attributes)}];")
        by_row.setdefault(node["row"], []).append(f"n{index}")
    if nodes:
        for row, label in enumerate(rows):
            members = " ".join(by_row.get(row, []))
            lines.append(f"  {{ rank=same; r{row} [label={_dot_string(label)}, shape=plaintext, style=\"\"]; {members} }}")
        lines.append("  " + " -> ".join(f"r{row}" for row in range(len(rows))) + " [style=invis];")
    max_abs = max((abs(weight) for _, _, weight in links), default=0.0) or 1.0
    for source, target, weight in links:
        width = 0.4 + 4.0 * abs(weight) / max_abs
        colour = POSITIVE if weight >= 0 else NEGATIVE
        lines.append(f"  n{source} -> n{target} [penwidth={width:.2f}, color={_dot_string(colour)}, "
                     f"tooltip={_dot_string(f'{weight:.4g}')}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _strongest_edges(payload: dict[str, Any], max_edges: int | None) -> dict[str, Any]:
    """The payload with only its ``max_edges`` largest-|weight| links (all nodes kept), title noting the cut.

    A picture of thousands of edges is unreadable, and dot's layout time grows steeply with them."""
    links = payload["links"]
    if max_edges is None or len(links) <= max_edges:
        return payload
    kept = sorted(links, key=lambda link: -abs(link[2]))[:max_edges]
    return {**payload, "links": kept, "title": f"{payload['title']} (strongest {max_edges} of {len(links)} edges)"}


def _render_with_dot(payload: dict[str, Any], path: Path, fmt: str, dot: str, timeout: float = 300) -> None:
    with atomic_path(path) as tmp:
        try:
            result = subprocess.run([dot, f"-T{fmt}", "-o", str(tmp)], input=graph_to_dot(payload).encode("utf-8"),
                                    capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"graphviz dot took over {timeout:.0f} s on {len(payload['nodes'])} nodes and "
                               f"{len(payload['links'])} edges; lower max_edges or use engine='matplotlib'.") from None
        if result.returncode != 0:
            raise RuntimeError(f"graphviz dot failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        make_readable(tmp)


def _render_with_matplotlib(payload: dict[str, Any], path: Path, fmt: str) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    nodes, links, rows, tokens = payload["nodes"], payload["links"], payload["rows"], payload["tokens"]
    positions, centres, total_width = layout_positions(payload)
    width = max(4.0, 0.9 * total_width + 1.5)
    figure, axes = plt.subplots(figsize=(min(width, 40.0), 1.0 + 0.9 * len(rows)))
    axes.set_title(_short(payload["title"], 80), fontsize=10)
    if not nodes:
        axes.text(0.5, 0.5, "empty graph: no nodes", ha="center", va="center", transform=axes.transAxes)
    if links:
        max_abs = max(abs(weight) for _, _, weight in links) or 1.0
        order = sorted(range(len(links)), key=lambda index: abs(links[index][2]))
        segments = [(positions[links[index][0]], positions[links[index][1]]) for index in order]
        strengths = [abs(links[index][2]) / max_abs for index in order]
        colours = [(POSITIVE if links[index][2] >= 0 else NEGATIVE) for index in order]
        axes.add_collection(LineCollection(segments, linewidths=[0.4 + 3.5 * s for s in strengths],
                                           colors=colours, alpha=0.6, zorder=1))
    markers = {"feature": "o", "error": "s", "embedding": "s", "logit": "D", "component": "p"}
    for kind, marker in markers.items():
        members = [index for index, node in enumerate(nodes) if node["kind"] == kind]
        if members:
            axes.scatter([positions[i][0] for i in members], [positions[i][1] for i in members], s=60,
                         marker=marker, c=KIND_COLOURS[kind], edgecolors="white", zorder=2, label=kind, gid=kind)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xticks(centres, [_short(repr(t)[1:-1] if not t.strip() else t, 12) for t in tokens],
                    rotation=35, ha="right", fontsize=8)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.set_xlim(0, max(total_width, 1.0))
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if nodes:
        axes.legend(loc="upper left", fontsize=7, frameon=False, ncol=4, bbox_to_anchor=(0, -0.25))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, dpi=150)
        make_readable(tmp)
    return figure


def render_graph_image(graph: Any, path: str | os.PathLike, engine: str = "auto", title: str | None = None,
                       prompt_tokens: list[str] | None = None, max_edges: int | None = 600) -> Path:
    """Draw ``graph`` (graph JSON dict, path, or object exporting one) to ``path`` (.svg, .png or .pdf).

    ``engine``: "dot" (graphviz, must be installed), "matplotlib", or "auto" (dot when on PATH).
    ``max_edges``: draw only the strongest edges (None: all); every node is drawn.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"Cannot tell the image format of {path.name!r}; use a .svg, .png or .pdf file name.")
    if engine not in ("auto", "dot", "matplotlib"):
        raise ValueError(f"Unknown engine {engine!r}; use 'auto', 'dot' or 'matplotlib'.")
    payload = _strongest_edges(graph_payload(load_graph_json(graph), title=title, prompt_tokens=prompt_tokens),
                               max_edges)
    dot = find_dot()
    if engine == "dot" and dot is None:
        raise RuntimeError("graphviz `dot` is not on PATH; install graphviz (apt-get install graphviz) or use "
                           "engine='matplotlib'.")
    if engine in ("auto", "dot") and dot is not None:
        _render_with_dot(payload, path, fmt, dot)
    else:
        import matplotlib.pyplot as plt

        plt.close(_render_with_matplotlib(payload, path, fmt))
    return path

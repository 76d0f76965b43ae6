"""The demo's report: the circuit's top features in token terms and the HTML page that links the graph and
circuit viewers (``report.html`` with ``graph.html``, ``circuit.html`` and their data files)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FeatureSummary", "feature_summaries", "token_strings", "write_report"]


@dataclass
class FeatureSummary:
    """One circuit feature: its node id, AtP score, and what it does in token terms."""

    node_id: str
    site: str
    feature: int
    pos: int
    score: float
    promoted_tokens: list[str]   # largest direct effects of its decoder row on the logits
    activating_tokens: list[str]  # the tokens at its top activations in the demo text


def token_strings(model: Any, ids: list[int]) -> list[str]:
    """Each token id as the text it decodes to (the id itself for a model without a tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    texts = [tokenizer.decode([i]) for i in ids]
    # SentencePiece drops a word's leading space when one token is decoded alone; its piece still shows it
    return [(" " + text if str(piece).startswith("▁") and not text.startswith(" ") else text)
            for piece, text in zip(pieces, texts, strict=True)]


def _readable(model: Any, pieces: list[str]) -> list[str]:
    """Vocabulary pieces (``'Ġfoo'``, ``'▁Tim'``, ``'<0x0A>'``) as the text they decode to."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return pieces
    return token_strings(model, tokenizer.convert_tokens_to_ids(pieces))


def feature_summaries(model: Any, rm: Any, circuit: Any, dashboards: Any, n_top: int,
                      n_tokens: int) -> list[FeatureSummary]:
    """The circuit's ``n_top`` feature nodes by |score|, each with ``n_tokens`` tokens it promotes and fires on
    (read from the feature cards, ``dashboards``)."""
    from ..graph import parse_node_id

    scores = dict(zip(circuit.node_ids, circuit.node_scores, strict=True))
    features = [n for n in circuit.nodes if parse_node_id(n).kind == "feature"]
    features.sort(key=lambda n: -abs(scores[n]))
    out = []
    for node_id in features[:n_top]:
        node = parse_node_id(node_id)
        layer = rm.site(node.site).dictionary.cfg.layer
        entry = dashboards.features.get(f"{layer}_{node.feature}", {})
        promoted = _readable(model, [token for token, _ in entry.get("top_logits", [])[:n_tokens]])
        firing = _readable(model, [c["tokens"][c["focus"]] for c in entry.get("top_contexts", [])])
        activating = list(dict.fromkeys(firing))[:n_tokens]
        out.append(FeatureSummary(node_id, node.site, int(node.feature), node.pos, float(scores[node_id]),
                                  promoted, activating))
    return out


def write_report(out: Path, graph: Any, circuit: Any, dashboards: Any, model: Any, rm: Any, prompt: Any,
                 task_name: str, evaluation: dict, scores: Any, top: list[FeatureSummary],
                 predictions: list[tuple[str, float]], explanation: Any = None) -> dict[str, Path]:
    """Write ``report.html`` into ``out`` with the files it links: the graph (circuit-tracer JSON and its
    viewer), the circuit (JSON and its viewer) and the feature cards; returns them by name. The page opens
    with the explanation: a picture of the pruned graph, its labelled units with their measured ablation
    effects, and the steering example."""
    from ..graph import write_circuit_tracer_json
    from ..graph.export import write_graph_files
    from ..viz.viewer import write_viewer

    tokens = token_strings(model, rm.to_tokens(prompt).tolist())
    files = {"graph_json": out / "graph.json", "circuit_json": out / "circuit.json",
             "dashboards": out / "dashboards.json"}
    explained = explanation is not None
    write_circuit_tracer_json(graph, files["graph_json"], slug="featcircuits-demo",
                              labels=explanation.labels if explained else None,
                              supernodes=explanation.supernodes if explained else None)
    # the same graph with its feature dashboards, laid out for circuit-tracer's own frontend
    files["circuit_tracer"] = write_graph_files(graph, out / "circuit-tracer", "featcircuits-demo", dashboards=dashboards,
                                                labels=explanation.labels if explained else None,
                                                supernodes=explanation.supernodes if explained else None).parent
    circuit.save(files["circuit_json"])
    dashboards.save(files["dashboards"])
    task_tokens = None
    if circuit.graph is not None:
        task = circuit.graph.task
        task_tokens = token_strings(model, task.clean_tokens[0, : int(task.clean_last[0]) + 1].tolist())
    files["graph"] = write_viewer(files["graph_json"], out / "graph.html", dashboards=dashboards,
                                  title=f"Attribution graph: {''.join(tokens)[-80:]}")
    files["circuit"] = write_viewer(circuit, out / "circuit.html", dashboards=dashboards,
                                    title=f"{circuit.method} circuit for the {task_name} task",
                                    prompt_tokens=task_tokens)
    esc = html.escape
    rows = "".join(
        f"<tr><td><code>{esc(f.node_id)}</code></td><td>{f.score:+.3g}</td>"
        f"<td>{esc(', '.join(map(repr, f.promoted_tokens)))}</td><td>{esc(', '.join(map(repr, f.activating_tokens)))}</td></tr>"
        for f in top
    )
    preds = ", ".join(f"{esc(repr(t))} {p:.2f}" for t, p in predictions)
    lead = _explanation_html(out, files, explanation) if explained else ""
    counts = circuit.counts()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>featcircuits demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;text-align:left}}
code{{background:#f3f3f3}}</style></head><body>
<h1>featcircuits demo</h1>
<p>Model <b>{esc(str(model.cfg.model_name))}</b> with {len(rm.dictionaries)} dictionaries.</p>
{lead}
<h2>Attribution graph</h2>
<p>Prompt: <code>{esc(''.join(tokens))}</code><br>Top predictions: {preds}<br>
{graph.n_features} feature nodes (of {graph.n_active_features} active), {graph.n_edges} edges;
replacement score {scores.replacement_score:.3f}, completeness score {scores.completeness_score:.3f}.
<a href="graph.html">Open the graph viewer</a>, or circuit-tracer's:
<code>circuit-tracer start-server --graph_file_dir {esc(str(files["circuit_tracer"]))}</code>.</p>
<h2>Circuit ({esc(circuit.method)}, task <i>{esc(task_name)}</i>)</h2>
<p>{counts['features']} of {counts['n_features']} feature nodes and {counts['errors']} of {counts['n_errors']} error nodes. Faithfulness {evaluation['faithfulness']:.3f}
(1 = the circuit alone recovers the task metric), completeness {evaluation['completeness']:.3f}
(the rest alone; 0 = nothing outside the circuit matters). Metric: full model {evaluation['m_full']:.3f},
all ablated {evaluation['m_empty']:.3f}. <a href="circuit.html">Open the circuit viewer</a>.</p>
<h2>Top features</h2><table><tr><th>node</th><th>score</th><th>promotes (decoder &rarr; unembedding)</th>
<th>fires on</th></tr>{rows}</table></body></html>
"""
    files["report"] = out / "report.html"
    files["report"].write_text(page, encoding="utf-8")
    return files


def _explanation_html(out: Path, files: dict[str, Path], explanation: Any) -> str:
    """The report's opening: the pruned graph drawn (labels and supernodes included), the units with their
    measured effects, and the steering example."""
    from ..viz.static import render_graph_image

    esc = html.escape
    picture = ""
    try:
        files["picture"] = render_graph_image(files["graph_json"], out / "graph.svg", title="pruned attribution graph")
        picture = '<p><img src="graph.svg" alt="the pruned attribution graph" style="max-width:100%"></p>'
    except (RuntimeError, ValueError, OSError) as err:  # a picture is a nicety; the rest of the report stands
        picture = f"<p><i>No picture of the graph: {esc(str(err))}</i></p>"
    rows = "".join(f"<tr><td>{esc(unit.name)}</td><td>{len(unit.members)}</td><td>{unit.effect:+.3f}</td></tr>"
                   for unit in explanation.units)
    steering = ""
    if explanation.steered is not None:
        steering = (f"<p><b>Steering:</b> with <i>{esc(explanation.steered.name)}</i> switched off, "
                    f"p({esc(repr(explanation.target))}) goes from {explanation.target_prob_before:.2f} to "
                    f"{explanation.target_prob_after:.2f} and the model continues "
                    f"<code>{esc(repr(explanation.text_after))}</code> instead of "
                    f"<code>{esc(repr(explanation.text_before))}</code>.</p>")
    return (f"<h2>Explanation</h2>{picture}<table><tr><th>unit (supernode or feature; offline label)</th>"
            f"<th>features</th><th>effect on {esc(explanation.target)} when ablated (measured)</th></tr>{rows}"
            f"</table>{steering}")

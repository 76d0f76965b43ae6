"""featcircuits label DASHBOARDS.json --model M --dictionaries D --held-out FILE [--explainer-url URL ...]"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = "Label every feature of a dashboards file (offline, or through an OpenAI-compatible endpoint) and score it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dashboards", help="a dashboards JSON file (FeatureDashboards.save); rewritten with labels")
    parser.add_argument("--model", required=True, help="checkpoint dir or TransformerLens model name")
    parser.add_argument("--dictionaries", required=True, help="the dictionaries the dashboards were computed for")
    parser.add_argument("--held-out", required=True, help="a text file the dashboards were not computed on")
    parser.add_argument("--held-out-tokens", type=int, default=20000, help="tokens of it to score on")
    parser.add_argument("--context", type=int, default=64, help="tokens per held-out row (BOS first)")
    parser.add_argument("--explainer-url", help="an OpenAI-compatible API base, e.g. http://localhost:8000/v1 "
                                                "(off by default: labels are offline)")
    parser.add_argument("--explainer-model", default="default", help="the model name the endpoint serves")
    parser.add_argument("--explainer-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    parser.add_argument("--device", default="cpu")


def _held_out_rows(model, path: Path, n_tokens: int, context: int):
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--held-out {path} is not a file; give a text file to score the labels on.")
    with path.open(errors="replace") as file:
        text = file.read(max(8 * n_tokens, 4096))  # a few bytes per token: read only what is scored
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    n_rows = len(ids) // (context - 1)
    if n_rows == 0:
        raise ValueError(f"--held-out {path} gives {len(ids)} tokens, fewer than one row of --context {context}.")
    rows = torch.tensor(ids[: n_rows * (context - 1)]).view(n_rows, context - 1)
    bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
    return torch.cat([torch.full((n_rows, 1), int(bos)), rows], dim=1).to(model.cfg.device)


def _mean(values) -> tuple[float, int]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return (sum(finite) / len(finite) if finite else float("nan")), len(finite)


def run(args: argparse.Namespace) -> int:
    from ..explain.explainer import ChatClient, explain_features, held_out_texts, llm_score_features
    from ..explain.labels import held_out_activations, label_dashboards, score_labels, special_ids
    from ..hub.loading import load_dictionaries
    from ..models import load_model
    from ..viz.dashboards import FeatureDashboards, token_strings

    dashboards = FeatureDashboards.load(args.dashboards)
    model = load_model(args.model, device=args.device)
    dictionaries = load_dictionaries(args.dictionaries, device=args.device)
    labels = label_dashboards(dashboards)
    rows = _held_out_rows(model, Path(args.held_out), args.held_out_tokens, args.context)
    acts = held_out_activations(model, dictionaries, rows, dashboards)
    scores = score_labels(model, dictionaries, rows, dashboards, activations=acts)
    llm_scores: dict = {}
    if args.explainer_url:
        client = ChatClient(args.explainer_url, args.explainer_model, api_key_env=args.explainer_key_env)
        explain_features(dashboards, client)
        failed = [k for k, e in dashboards.features.items() if str(e.get("explanation_source", "")).startswith("offline")]
        if failed:
            print(f"explainer: {dashboards.features[failed[0]]['explanation_source']}; "
                  f"{len(failed)} features kept their offline label")
        pieces, special, cpu_rows = token_strings(model), special_ids(model), rows.cpu()
        texts = {key: held_out_texts(cpu_rows, acts[key], pieces, special) for key in acts if key not in failed}
        llm_scores, failure = llm_score_features(dashboards, client, texts)
        if failure:
            print(f"explainer scoring stopped ({failure}); the offline scores stand")
    dashboards.save(args.dashboards)
    detection, n_detection = _mean(s["detection"] for s in scores.values())
    fuzzing, n_fuzzing = _mean(s["fuzzing"] for s in scores.values())
    print(f"labelled {len(labels)} features; on held-out text, detection score: mean {detection:.3f} over "
          f"{n_detection} ({len(scores) - n_detection} never or always active there); fuzzing score: mean "
          f"{fuzzing:.3f} over {n_fuzzing}")
    if llm_scores:
        llm_detection, n_llm = _mean(s.get("llm_detection") for s in llm_scores.values())
        llm_fuzzing, n_llm_fuzzing = _mean(s.get("llm_fuzzing") for s in llm_scores.values())
        print(f"explainer {args.explainer_model}: detection mean {llm_detection:.3f} over {n_llm}, fuzzing mean "
              f"{llm_fuzzing:.3f} over {n_llm_fuzzing}")

    def rank(key: str) -> float:
        value = scores[key]["detection"]
        return -value if not math.isnan(value) else 1.0

    print(f"  {'feature':>10}  detect  fuzz  label")
    for key in sorted(scores, key=rank)[:5]:
        fuzz = scores[key]["fuzzing"]
        print(f"  {key:>10}  {scores[key]['detection']:.3f}  {fuzz:.3f}  {labels[key]}")
    print(f"wrote {args.dashboards}")
    return 0

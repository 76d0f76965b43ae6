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


def run(args: argparse.Namespace) -> int:
    from ..explain.explainer import ChatClient, explain_features
    from ..explain.labels import label_dashboards, score_labels
    from ..hub.loading import load_dictionaries
    from ..models import load_model
    from ..viz.dashboards import FeatureDashboards

    dashboards = FeatureDashboards.load(args.dashboards)
    model = load_model(args.model, device=args.device)
    dictionaries = load_dictionaries(args.dictionaries, device=args.device)
    labels = label_dashboards(dashboards)
    scores = score_labels(model, dictionaries, _held_out_rows(model, Path(args.held_out), args.held_out_tokens,
                                                              args.context), dashboards)
    if args.explainer_url:
        client = ChatClient(args.explainer_url, args.explainer_model, api_key_env=args.explainer_key_env)
        explain_features(dashboards, client)
        failed = [k for k, e in dashboards.features.items() if str(e.get("explanation_source", "")).startswith("offline")]
        if failed:
            print(f"explainer: {dashboards.features[failed[0]]['explanation_source']}; "
                  f"{len(failed)} features kept their offline label")
    dashboards.save(args.dashboards)
    finite = [s for s in scores.values() if not math.isnan(s)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    print(f"labelled {len(labels)} features; detection score on held-out text: mean {mean:.3f} over {len(finite)} "
          f"({len(scores) - len(finite)} never or always active there)")
    for key in sorted(scores, key=lambda k: -scores[k] if not math.isnan(scores[k]) else 1.0)[:5]:
        print(f"  {key:>10}  {scores[key]:.3f}  {labels[key]}")
    print(f"wrote {args.dashboards}")
    return 0

"""featcircuits steer --model M --dictionaries D --prompt P --set mlp2:113=0 [--set L3.H2=*2 ...]"""

from __future__ import annotations

import argparse

HELP = "Intervene on features, error terms, heads or MLPs by node id and print the text before and after."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint dir or TransformerLens model name")
    parser.add_argument("--dictionaries", help="dictionaries to splice in (a directory or a release); needed for "
                                               "feature and error nodes")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--set", dest="interventions", action="append", default=[], metavar="NODE=SPEC",
                        help="e.g. mlp2:113=0 (at every position), mlp2:113@5=3.5, mlp2:error@5=ablate, "
                             "L3.H2=*0.5; repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--top", type=int, default=5, help="top next tokens to list before and after")
    parser.add_argument("--device", default="cpu")


def _parse(items: list[str]) -> dict[str, str]:
    interventions = {}
    for item in items:
        node, sep, spec = item.partition("=")
        if not sep or not node.strip() or not spec.strip():
            raise ValueError(f"--set {item!r}: write NODE=SPEC, e.g. --set mlp2:113=0 or --set L3.H2=*2.")
        interventions[node.strip()] = spec.strip()
    if not interventions:
        raise ValueError("Give at least one --set NODE=SPEC (e.g. --set mlp2:113=0).")
    return interventions


def run(args: argparse.Namespace) -> int:
    from ..explain import generate, intervene
    from ..hub.loading import load_dictionaries
    from ..models import load_model
    from ..patching.replacement import ReplacementModel

    interventions = _parse(args.interventions)
    model = load_model(args.model, device=args.device)
    target = ReplacementModel(model, load_dictionaries(args.dictionaries, device=args.device)) \
        if args.dictionaries else model
    result = intervene(target, args.prompt, interventions, top_k=args.top)
    text = generate(target, args.prompt, interventions, max_new_tokens=args.max_new_tokens)

    def listed(top: list[tuple[str, float]]) -> str:
        return ", ".join(f"{token!r} {prob:.2f}" for token, prob in top)

    print(f"interventions: {', '.join(f'{k}={v}' for k, v in interventions.items())}")
    print(f"next token before: {listed(result.top_before)}")
    print(f"next token after:  {listed(result.top_after)}")
    print(f"prompt: {args.prompt!r}")
    print(f"continuation before: {text.text_before!r}")
    print(f"continuation after:  {text.text_after!r}")
    return 0

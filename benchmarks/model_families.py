"""Every model family load_model reads, checked end to end on tiny random checkpoints (CPU).

For each family (tests/families.py builds the checkpoint with ``transformers``): the largest logit difference
from transformers' own forward; the gradient engine ``build_graph`` takes and, if not the linear one, why; the
largest relative edge error ``verify`` finds with TopK transcoders at every layer and with residual-stream
SAEs; the largest metric difference between component edge ablations after the shared clean prefix (the
fast path) and whole-model hooked forwards; and the largest difference between the replacement model's
logits and the model's. Prints one table row per family, then one summary line.

    python benchmarks/model_families.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import prefix_sharing_task  # noqa: E402
from families import FAMILIES, build_checkpoint, reference_model  # noqa: E402

from featcircuits import Dictionary, DictionaryConfig, load_model  # noqa: E402
from featcircuits.circuits import ComponentGraph  # noqa: E402
from featcircuits.graph import build_graph, verify  # noqa: E402
from featcircuits.patching.linear_backward import unsupported_reason  # noqa: E402
from featcircuits.patching.replacement import ReplacementModel  # noqa: E402


def dictionaries(model, kind: str) -> list[Dictionary]:
    torch.manual_seed(0)
    out = []
    for layer in range(model.cfg.n_layers):
        if kind == "transcoder":
            hooks = dict(hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
        else:
            hooks = dict(hook_in=f"blocks.{layer}.hook_resid_post")
        out.append(Dictionary.from_config(DictionaryConfig(d_in=model.cfg.d_model, d_sae=64, kind=kind,
                                                           activation="topk", k=8, **hooks)))
    return out


def check(family: str, folder: Path) -> dict:
    path = build_checkpoint(family, folder / family)
    model = load_model(path)
    tokens = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    with torch.no_grad():
        reference = reference_model(path)(tokens).logits
        logits_diff = float((model(tokens) - reference).abs().max())
    row = {"family": family, "logits_diff": logits_diff}
    transcoders = ReplacementModel(model, dictionaries(model, "transcoder"))
    reason = unsupported_reason(transcoders)
    row["engine"] = "linear" if reason is None else f"autograd ({reason})"
    start = time.perf_counter()
    graph = build_graph(transcoders, prompt=tokens[0], progress=False)
    row["graph_s"] = time.perf_counter() - start
    row["verify_tc"] = verify(graph, n_sources=32).max_rel_error
    saes = ReplacementModel(model, dictionaries(model, "sae"))
    row["verify_sae"] = verify(build_graph(saes, prompt=tokens[0], progress=False), n_sources=32).max_rel_error
    with torch.no_grad():
        # every site through decode(features) + error, the soft cap in the logits head
        spliced = {site.name: (lambda error: error) for site in transcoders.sites}
        replaced = transcoders.run(tokens[0], errors=spliced).logits[0]
        row["replacement_diff"] = float((replaced - model(tokens[:1])[0]).abs().max())
    task = prefix_sharing_task(model)
    fast = ComponentGraph(model, task, ablation="patch")
    plain = ComponentGraph(model, task, ablation="patch", skip_clean_prefix=False)
    keep = (torch.rand(16, len(fast.edge_ids), generator=torch.Generator().manual_seed(1)) > 0.3).float()
    row["edge_diff"] = float((fast.edge_metric(keep) - plain.edge_metric(keep)).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILIES:
            rows.append(check(family, Path(folder)))
    print("| family | logits vs transformers | replacement vs model | graph engine | build_graph | verify (transcoders)"
          " | verify (SAEs) | edge ablations: fast vs whole-model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['logits_diff']:.1e} | {r['replacement_diff']:.1e} | {r['engine']} | "
              f"{r['graph_s']:.2f} s | {r['verify_tc']:.1e} | {r['verify_sae']:.1e} | {r['edge_diff']:.1e} |")
    worst = {key: max(r[key] for r in rows) for key in ("logits_diff", "replacement_diff", "verify_tc", "verify_sae",
                                                       "edge_diff")}
    print(f"families={len(rows)} " + " ".join(f"max_{key}={value:.2e}" for key, value in worst.items()))


if __name__ == "__main__":
    main()

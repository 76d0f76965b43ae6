"""featcircuits build_graph vs circuit-tracer attribute: same model, transcoders and prompt, one run.

circuit-tracer pins an older transformers stack, so it runs in its own virtual environment, built once:

    python3 -m venv /tmp/fc-graph-ct-venv
    /tmp/fc-graph-ct-venv/bin/pip install torch==2.13.0      # the CPU wheel first
    /tmp/fc-graph-ct-venv/bin/pip install circuit-tracer==0.5.0

Then, from the repository root in featcircuits' environment:

    python benchmarks/graph_vs_circuit_tracer.py [--ct-python /tmp/fc-graph-ct-venv/bin/python]

Steps: random ReLU transcoders for every layer of stories260k (native files, then ``featcircuits convert
--to circuit-tracer``); the model's TransformerLens weights and config are written for the other venv,
which builds circuit-tracer's ``ReplacementModel`` from them and loads the transcoders with its own
``load_transcoders``. Each side builds the full graph (all active features, the top logits) once to
warm up and then ``--repeats`` times; the best wall time counts. Both sides run with the same torch
thread count (``--threads``, default 1) and, by default, the same batch of 128 targets per backward
pass. ``--clt``: one random cross-layer transcoder in circuit-tracer's CLT layout (written by
``save_dictionary(..., format="circuit-tracer")``, read by circuit-tracer's cache loader and ``load_clt``)
in place of the per-layer transcoders. circuit-tracer zeroes the BOS position's features and errors, so the adjacencies are compared on
circuit-tracer's nodes, leaving out the BOS error columns. Last line: ``speedup_vs_circuit_tracer=<x> max_abs_diff=<y>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the"


def circuit_tracer_side(work: Path, repeats: int, batch_size: int) -> None:
    """Runs in circuit-tracer's venv; imports no featcircuits."""
    import torch
    import yaml
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import load_file, save_file
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    torch.set_grad_enabled(True)
    fields = json.loads((work / "model_config.json").read_text())
    cfg = HookedTransformerConfig(**fields)
    model = TransformerLensReplacementModel(cfg, tokenizer=AutoTokenizer.from_pretrained(str(STORIES)))
    model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
    config = yaml.safe_load((work / "ct" / "config.yaml").read_text())
    if config.get("model_kind") == "cross_layer_transcoder":  # read by its own cache loader (calls load_clt)
        from circuit_tracer.utils.caching import load_transcoders_from_cache

        transcoders, _ = load_transcoders_from_cache("ct", cache_dir=work, device=torch.device("cpu"),
                                                     lazy_encoder=False, lazy_decoder=False)
    else:
        config["transcoders"] = [str(work / "ct" / f) for f in config["transcoders"]]
        transcoders = load_transcoders(config, device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    model._configure_replacement_model(transcoders)
    tokens = torch.tensor(json.loads((work / "tokens.json").read_text()))
    attribute(tokens[:8], model, batch_size=batch_size)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        graph = attribute(tokens, model, batch_size=batch_size)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    selected = graph.active_features[graph.selected_features]
    save_file({"adjacency": graph.adjacency_matrix.contiguous(), "features": selected.contiguous(),
               "logit_tokens": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets])},
              str(work / "ct_graph.safetensors"))
    import importlib.metadata

    print(json.dumps({"seconds": min(times), "cpu_seconds": min(cpu), "version": importlib.metadata.version("circuit-tracer"),
                      "n_features": int(selected.shape[0])}))


def featcircuits_side(work: Path, repeats: int, batch_size: int, d_sae: int, bias: float, clt: bool = False):
    import torch
    from safetensors.torch import save_file

    from featcircuits import Dictionary, DictionaryConfig, load_model
    from featcircuits.cli import main as cli
    from featcircuits.dictionaries import save_dictionary
    from featcircuits.graph import ReplacementModel, build_graph
    from featcircuits.models import hf_config_to_hooked_config

    torch.manual_seed(0)
    model = load_model(STORIES)
    dictionaries = []
    for layer in range(0 if clt else model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=64, d_sae=d_sae, kind="transcoder", layer=layer, model_name="stories260k",
                               hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
        dictionary = Dictionary.from_config(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_(bias)
            dictionary.b_dec.normal_(0, 0.05)
        save_dictionary(dictionary, work / "native" / f"layer_{layer}")
        dictionaries.append(dictionary)
    if clt:  # one ReLU CLT over every layer, d_sae latents per layer, in circuit-tracer's CLT layout
        cfg = DictionaryConfig(d_in=64, d_sae=d_sae, kind="cross_layer_transcoder", n_layers=model.cfg.n_layers,
                               model_name="stories260k", hook_in="blocks.{layer}.ln2.hook_normalized",
                               hook_out="blocks.{layer}.hook_mlp_out")
        dictionary = Dictionary.from_config(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_(bias)
            dictionary.b_dec.normal_(0, 0.05)
        save_dictionary(dictionary, work / "ct", format="circuit-tracer")
        dictionaries.append(dictionary)
    elif cli(["convert", str(work / "native"), str(work / "ct"), "--to", "circuit-tracer"]) != 0:
        sys.exit("featcircuits convert --to circuit-tracer failed")
    hf_config = json.loads((STORIES / "config.json").read_text())
    fields = {key: value for key, value in hf_config_to_hooked_config(hf_config).to_dict().items()
              if key in ("d_model", "d_head", "n_heads", "n_key_value_heads", "d_mlp", "n_layers", "n_ctx", "d_vocab",
                         "eps", "act_fn", "normalization_type", "final_rms", "gated_mlp", "positional_embedding_type",
                         "rotary_dim", "rotary_base", "rotary_adjacent_pairs", "original_architecture",
                         "tokenizer_prepends_bos")}
    (work / "model_config.json").write_text(json.dumps(fields))
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, str(work / "model.safetensors"))
    replacement = ReplacementModel(model, dictionaries)
    tokens = replacement.to_tokens(PROMPT)
    (work / "tokens.json").write_text(json.dumps(tokens.tolist()))
    build_graph(replacement, prompt=tokens[:8], progress=False, batch_size=batch_size)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        graph = build_graph(replacement, prompt=tokens, progress=False, batch_size=batch_size)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return graph, min(times), min(cpu)


def compare(graph, work: Path) -> tuple[float, int, str]:
    """Max |difference| over circuit-tracer's nodes (features, errors, tokens, logits), BOS errors left out."""
    import torch
    from safetensors.torch import load_file

    from featcircuits.graph.attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET

    ct = load_file(str(work / "ct_graph.safetensors"))
    keys = graph.node_keys
    n_layers, n_pos = len(graph.sites), int(graph.tokens.numel())
    lookup = {tuple(k): i for i, k in enumerate(keys.tolist())}
    index = [lookup[(FEATURE, layer, pos, feat)] for layer, pos, feat in ct["features"].tolist()]
    index += [lookup[(ERROR, layer, pos, -1)] for layer in range(n_layers) for pos in range(n_pos)]
    index += [lookup[(EMBEDDING, -1, pos, -1)] for pos in range(n_pos)]
    ours_targets = {graph.targets[int(k[3])].token: i for i, k in enumerate(keys.tolist()) if k[0] == TARGET}
    missing = [int(t) for t in ct["logit_tokens"].tolist() if int(t) not in ours_targets]
    if missing:
        return float("nan"), 0, f"logit targets differ: circuit-tracer has {missing} that featcircuits lacks"
    index += [ours_targets[int(t)] for t in ct["logit_tokens"].tolist()]
    index = torch.tensor(index)
    ours = graph.adjacency[index][:, index]
    theirs = ct["adjacency"].float()
    n_feat = ct["features"].shape[0]
    keep = torch.ones(index.numel(), dtype=torch.bool)
    keep[[n_feat + layer * n_pos for layer in range(n_layers)]] = False  # BOS error columns (zeroed there)
    diff = (ours[:, keep] - theirs[:, keep]).abs()
    note = f"{n_feat} circuit-tracer features vs {graph.n_features} featcircuits features (incl. BOS)"
    return float(diff.max()), int(theirs.count_nonzero()), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["ct"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--ct-python", default="/tmp/fc-graph-ct-venv/bin/python")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="featcircuits' batch (its default)")
    parser.add_argument("--ct-batch-size", type=int, default=128,
                        help="circuit-tracer's batch (its own default is 512, slower on CPU than 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on both sides (0: torch's default; 1 is fastest for both "
                             "on a shared 2-core machine)")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--bias", type=float, default=-2.0, help="encoder bias of the random transcoders")
    parser.add_argument("--clt", action="store_true",
                        help="one random cross-layer transcoder (--d-sae latents per layer) instead of per-layer "
                             "transcoders; circuit-tracer reads it with its own CLT loader")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.step == "ct":
        circuit_tracer_side(args.work, args.repeats, args.batch_size)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="featcircuits-graph-bench-"))
    graph, ours, ours_cpu = featcircuits_side(work, args.repeats, args.batch_size, args.d_sae, args.bias, args.clt)
    print(f"featcircuits: {graph} in {ours:.2f}s wall, {ours_cpu:.2f}s CPU (best of {args.repeats})")
    result = subprocess.run([args.ct_python, __file__, "ct", "--work", str(work), "--repeats", str(args.repeats),
                             "--batch-size", str(args.ct_batch_size), "--threads", str(args.threads)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"circuit-tracer run failed in {args.ct_python}:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    max_abs_diff, n_edges, note = compare(graph, work)
    theirs = report["seconds"]
    print(f"circuit-tracer {report['version']}: {report['n_features']} features, {n_edges} non-zero edges "
          f"in {theirs:.2f}s wall, {report['cpu_seconds']:.2f}s CPU (best of {args.repeats}); {note}")
    print(f"wall: featcircuits {ours:.2f}s, circuit-tracer {theirs:.2f}s, ratio {theirs / ours:.2f}; "
          f"CPU: featcircuits {ours_cpu:.2f}s, circuit-tracer {report['cpu_seconds']:.2f}s, "
          f"ratio {report['cpu_seconds'] / ours_cpu:.2f}")
    print(f"speedup_vs_circuit_tracer={theirs / ours:.2f} max_abs_diff={max_abs_diff:.3g}")


if __name__ == "__main__":
    main()

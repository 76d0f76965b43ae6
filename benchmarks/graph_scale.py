"""Attribution graphs at the scale of real models: featcircuits build_graph vs circuit-tracer attribute.

Random-weight models at real shapes, random ReLU transcoders on every MLP (encoder biases set so that
about ``--per-token`` features per token per layer are active), one prompt of random tokens, both sides
at the same ``max_feature_nodes`` and batch size, each in its own fresh process (so each peak RSS is its
own: model, transcoders and attribution). circuit-tracer 0.5.0 runs in its own virtual environment, as in
benchmarks/graph_vs_circuit_tracer.py (``--ct-python``), with its default lazy decoder.

Shapes (``--shapes``; a vocabulary of 500 of stories260k's 512 tokens throughout, since circuit-tracer decodes
target tokens with a tokenizer; the vocabulary only sizes the embedding and unembedding):

* ``small``: 6 layers, d_model 512, 8 heads, learned positions (GPT-2 style), 8,192 latents;
* ``gpt2``: GPT-2 small's shape (12 layers, d_model 768, 12 heads), 24,576 latents;
* ``gemma``: Gemma-2-2B's sizes (26 layers, d_model 2304, 8 query / 4 key-value heads of 256, rotary,
  RMSNorm, gated GELU MLP) in a pre-norm block, 16,384 latents; its MLP width is ``--gemma-d-mlp``
  (default 2304, not 9216: the MLP only runs in the clean forward pass, and a 9216-wide one would add 5 GB
  of weights to each process on this machine).

Compared on the nodes both graphs hold (features selected by both; every error except circuit-tracer's
zeroed BOS errors; embeddings; targets), embeddings included. circuit-tracer's embedding node is the token
embedding alone (``W_E[token]``, taken at ``hook_embed``), featcircuits' is the whole input of block 0
(token plus learned position embedding; see AttributionGraph). On learned-position models the position
part of each embedding edge is measured by intervention (a frozen forward with the position embedding
removed at one position per batch row) and taken off featcircuits' edge before comparing.

``--gemma64``: featcircuits alone on a 64-token Gemma-2-2B-shaped prompt at ``max_feature_nodes=8192``
(model and transcoders made in the child process, in ``--gemma64-dtype``, bf16 by default; attribution in
fp32), stopped after ``--gemma64-seconds``: the rows and the decoder layout are allocated before the first
row, so the peak RSS read then holds them; only the final adjacency over the kept nodes (``[n_final,
n_final]`` fp32, 0.4 GB) comes later, and is printed with the estimate. The time of the whole run is
extrapolated from the rows done.

Usage (from the repository root, featcircuits' environment):

    python benchmarks/graph_scale.py [--shapes small,gpt2,gemma] [--gemma64] [--device cuda] [--quick]

Last line: ``speedup_vs_circuit_tracer=<x> max_abs_diff=<y> peak_rss_ratio=<z>`` (the smallest speedup,
the largest difference and the largest featcircuits / circuit-tracer peak RSS ratio over the shapes run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"
VOCAB = 500  # not 512 = d_model of "small": circuit-tracer tells the unembedding orientation by the vocabulary size

SHAPES = {
    "small": dict(n_layers=6, d_model=512, d_head=64, n_heads=8, d_mlp=2048, n_ctx=256, d_vocab=VOCAB,
                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                  original_architecture="GPT2LMHeadModel"),
    "gpt2": dict(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, n_ctx=256, d_vocab=VOCAB,
                 act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                 original_architecture="GPT2LMHeadModel"),
    "gemma": dict(n_layers=26, d_model=2304, d_head=256, n_heads=8, n_key_value_heads=4, d_mlp=2304, n_ctx=256,
                  d_vocab=VOCAB, act_fn="gelu_pytorch_tanh", normalization_type="RMS", final_rms=True,
                  gated_mlp=True, positional_embedding_type="rotary", rotary_dim=256, rotary_base=10000,
                  rotary_adjacent_pairs=False, original_architecture="LlamaForCausalLM"),
}
D_SAE = {"small": 8192, "gpt2": 24576, "gemma": 16384}
# (prompt length, max_feature_nodes, batch size) per shape; --quick shortens every run
RUNS = {"small": (16, 2048, 128), "gpt2": (16, 4096, 128), "gemma": (6, 1024, 64)}
QUICK = {"small": (8, 512, 64), "gpt2": (8, 512, 64), "gemma": (4, 256, 32)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def random_setup(shape: str, n_pos: int, per_token: int, seed: int, device: str, dtype: str = "float32"):
    """The random model ``[fields, model, tokens]`` and then, one at a time, each layer's transcoder with the
    encoder bias that leaves about ``per_token`` features active per token at that layer (a generator, so
    that only one transcoder need be in memory at a time in float32)."""
    import torch

    from featcircuits import load_model
    from featcircuits.dictionaries import Dictionary, DictionaryConfig

    fields = dict(SHAPES[shape])
    model = load_model(fields, seed=seed, device=device, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n_pos,), generator=generator)
    tokens[0] = 1  # BOS of the stories260k tokenizer
    inputs: dict[int, torch.Tensor] = {}
    hooks = [(f"blocks.{layer}.ln2.hook_normalized", lambda x, hook, layer=layer: inputs.__setitem__(layer, x[0]))
             for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(tokens[None].to(device), fwd_hooks=hooks)
    yield fields, model, tokens
    for layer in range(model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=D_SAE[shape], kind="transcoder", layer=layer,
                               model_name=f"random-{shape}", hook_in=f"blocks.{layer}.ln2.hook_normalized",
                               hook_out=f"blocks.{layer}.hook_mlp_out")
        dictionary = Dictionary.from_config(cfg).to(device)
        with torch.no_grad():  # the bias that leaves about per_token features active per token at this layer
            pre = inputs[layer].float() @ dictionary.W_enc
            cut = pre.flatten().kthvalue(pre.numel() - per_token * n_pos).values
            dictionary.b_enc.fill_(-float(cut))
            dictionary.b_dec.normal_(0, 0.05)
        yield dictionary.to(getattr(torch, dtype))


def prepare(work: Path, shape: str, n_pos: int, per_token: int, seed: int, device: str) -> None:
    """Random model and transcoders (native files, then circuit-tracer's), the prompt; in its own process."""
    from safetensors.torch import save_file

    from featcircuits.cli import main as cli
    from featcircuits.dictionaries import save_dictionary

    setup = random_setup(shape, n_pos, per_token, seed, device)
    fields, model, tokens = next(setup)
    (work / "model_config.json").write_text(json.dumps(fields))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}, str(work / "model.safetensors"))
    (work / "tokens.json").write_text(json.dumps(tokens.tolist()))
    for layer, dictionary in enumerate(setup):
        save_dictionary(dictionary.cpu(), work / "native" / f"layer_{layer}")
    del model, setup  # before the conversion, which reads every transcoder (the generator holds the model)
    if cli(["convert", str(work / "native"), str(work / "ct"), "--to", "circuit-tracer"]) != 0:
        sys.exit("featcircuits convert --to circuit-tracer failed")


def featcircuits_in_memory(shape: str, n_pos: int, n_keep: int, batch: int, per_token: int, dtype: str,
                           seconds: float) -> None:
    """The 64-token run: model and transcoders made in this process (in ``dtype``; no files), build_graph
    stopped after ``seconds``; prints rows done, peak RSS and timings as JSON."""
    import signal

    import featcircuits.graph.attribution as attribution
    from featcircuits.graph import ReplacementModel, build_graph

    setup = random_setup(shape, n_pos, per_token, 0, "cpu", dtype)
    _, model, tokens = next(setup)
    rm = ReplacementModel(model, list(setup))
    counted = {"rows": 0, "first": None}

    class Counting(attribution.RowComputer):  # rows done, for a run stopped early
        def rows(self, seeds, final_seed, n_pos, rows):
            super().rows(seeds, final_seed, n_pos, rows)
            counted["rows"] += rows.shape[0]
            if counted["first"] is None:
                counted["first"] = time.perf_counter()

    attribution.RowComputer = Counting  # type: ignore[misc]
    before = peak_rss_gb()

    def stop(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(seconds))
    start = time.perf_counter()
    try:
        graph = build_graph(rm, prompt=tokens, max_feature_nodes=n_keep, batch_size=batch, progress=True,
                            memory_budget_gb=1e9)
        done = {"seconds": time.perf_counter() - start, "active": graph.n_active_features}
    except TimeoutError:
        done = {"stopped_after_s": time.perf_counter() - start}
    from featcircuits.graph.memory import estimate_graph_memory
    from featcircuits.graph.rows import layout_entries

    clean = rm.clean_run(tokens)
    sites, positions = attribution._active_features(rm, clean)[:2]
    n_active = int(sites.numel())
    estimate = estimate_graph_memory(rm, n_pos, n_active, n_keep, 10, batch, "linear",
                                     layout_vectors=layout_entries(sites, positions, len(rm.sites), n_pos))
    print(json.dumps({**done, "rows_done": counted["rows"], "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before,
                      "first_row_s": (counted["first"] or start) - start, "n_active": n_active,
                      "estimate_gb": estimate["total"] / 2**30, "adjacency_gb": estimate["adjacency"] / 2**30}))


def featcircuits_side(work: Path, n_pos: int, n_keep: int, batch: int, device: str, dtype: str) -> None:
    """build_graph on the prepared files; writes fc_graph.* and prints a JSON report. In its own process."""
    import torch
    from safetensors.torch import load_file, save_file

    from featcircuits import load_model
    from featcircuits.dictionaries import load_dictionary
    from featcircuits.graph import ReplacementModel, build_graph

    fields = json.loads((work / "model_config.json").read_text())
    model = load_model(fields, device=device, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in load_file(str(work / "model.safetensors")).items()},
                          strict=False)
    dictionaries = [load_dictionary(work / "native" / f"layer_{layer}", device=device).to(getattr(torch, dtype))
                    for layer in range(model.cfg.n_layers)]
    rm = ReplacementModel(model, dictionaries)
    tokens = torch.tensor(json.loads((work / "tokens.json").read_text()))[:n_pos]
    build_graph(rm, prompt=tokens[:4], max_feature_nodes=16, batch_size=8, progress=False)  # warm-up
    before = peak_rss_gb()
    start = time.perf_counter()
    graph = build_graph(rm, prompt=tokens, max_feature_nodes=n_keep, batch_size=batch, progress=False,
                        memory_budget_gb=1e9)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    graph.save(work / "fc_graph")
    save_file({"position_part": position_part(graph).contiguous().cpu()}, str(work / "fc_position.safetensors"))
    print(json.dumps({"seconds": elapsed, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before,
                      "n_features": graph.n_features, "active": graph.n_active_features,
                      "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}))


def position_part(graph):
    """``[n_receivers, n_pos]``: the part of each embedding edge carried by the learned position embedding,
    measured by intervention: row ``p + 1`` of one frozen forward removes ``W_pos[p]`` from block 0's input at
    position ``p``; each receiver (kept feature pre-activation, target) moves by minus that part. Zero for
    models without learned positions. Receivers in node order (features, then targets)."""
    import torch

    from featcircuits.graph.attribution_graph import FEATURE, TARGET

    rm, clean, keys = graph.replacement, graph.clean, graph.node_keys
    receivers = ((keys[:, 0] == FEATURE) | (keys[:, 0] == TARGET)).nonzero().squeeze(1)
    n_pos = clean.n_pos
    if rm.cfg.positional_embedding_type != "standard":
        return torch.zeros(receivers.numel(), n_pos)  # nothing to take off
    batch, device = n_pos + 1, clean.embeddings.device
    embeddings = clean.embeddings.expand(batch, -1, -1).clone()
    embeddings[torch.arange(1, batch, device=device), torch.arange(n_pos, device=device)] -= \
        rm.model.W_pos[:n_pos].detach().to(embeddings.dtype)
    with torch.no_grad():
        out = rm.run(clean.tokens, clean=clean, embeddings=embeddings, batch_size=batch, return_acts=True,
                     compute_logits=False)
    values = torch.zeros(batch, receivers.numel(), device=device)
    r_keys = keys[receivers]
    for column, (kind, site, pos, index) in enumerate(r_keys.tolist()):
        if kind == FEATURE:
            values[:, column] = out.pre_acts[graph.sites[site]][:, pos, index]
        else:
            target = graph.targets[index]
            values[:, column] = out.final[:, pos].float() @ target.vector.float() + target.bias
    return -(values[1:] - values[:1]).T.cpu()  # [receivers, n_pos]


def circuit_tracer_side(work: Path, n_pos: int, n_keep: int, batch: int) -> None:
    """Runs in circuit-tracer's venv; imports no featcircuits."""
    import importlib.metadata

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
    model = TransformerLensReplacementModel(HookedTransformerConfig(**fields),
                                            tokenizer=AutoTokenizer.from_pretrained(str(STORIES)))
    model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
    config = yaml.safe_load((work / "ct" / "config.yaml").read_text())
    config["transcoders"] = [str(work / "ct" / f) for f in config["transcoders"]]
    model._configure_replacement_model(load_transcoders(config, device=torch.device("cpu"),
                                                        lazy_decoder=os.environ.get("CT_LAZY", "1") == "1"))
    tokens = torch.tensor(json.loads((work / "tokens.json").read_text()))[:n_pos]
    attribute(tokens[:4], model, batch_size=8, max_feature_nodes=16)  # warm-up
    before = peak_rss_gb()
    start = time.perf_counter()
    graph = attribute(tokens, model, batch_size=batch, max_feature_nodes=n_keep)
    elapsed = time.perf_counter() - start
    selected = graph.active_features[graph.selected_features]
    save_file({"adjacency": graph.adjacency_matrix.contiguous(), "features": selected.contiguous(),
               "logit_tokens": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets])},
              str(work / "ct_graph.safetensors"))
    print(json.dumps({"seconds": elapsed, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before,
                      "version": importlib.metadata.version("circuit-tracer"), "n_features": int(selected.shape[0]),
                      "active": int(graph.active_features.shape[0])}))


def compare(work: Path) -> tuple[float, float, int]:
    """Max |difference| on the shared nodes: (all columns, embedding columns alone, shared features)."""
    import torch
    from safetensors.torch import load_file

    from featcircuits.graph import AttributionGraph
    from featcircuits.graph.attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET

    graph = AttributionGraph.load(work / "fc_graph")
    position = load_file(str(work / "fc_position.safetensors"))["position_part"]
    ct = load_file(str(work / "ct_graph.safetensors"))
    keys = graph.node_keys.tolist()
    assert graph.tokens is not None  # a single-prompt graph
    n_sites, n_pos = len(graph.sites), int(graph.tokens.numel())
    lookup = {tuple(k): i for i, k in enumerate(keys)}
    receivers = [i for i, k in enumerate(keys) if k[0] in (FEATURE, TARGET)]
    receiver_row = {node: row for row, node in enumerate(receivers)}
    ct_nodes = [(FEATURE, layer, pos, feat) for layer, pos, feat in ct["features"].tolist()]
    shared_features = [i for i, node in enumerate(ct_nodes) if node in lookup]
    n_ct_features = len(ct_nodes)
    ours_index = [lookup[ct_nodes[i]] for i in shared_features]
    theirs_index = list(shared_features)
    for layer in range(n_sites):  # errors (circuit-tracer zeroes the BOS ones: left out)
        for pos in range(1, n_pos):
            ours_index.append(lookup[(ERROR, layer, pos, -1)])
            theirs_index.append(n_ct_features + layer * n_pos + pos)
    n_source_cols = len(ours_index)
    for pos in range(n_pos):
        ours_index.append(lookup[(EMBEDDING, -1, pos, -1)])
        theirs_index.append(n_ct_features + n_sites * n_pos + pos)
    targets = {graph.targets[k[3]].token: i for i, k in enumerate(keys) if k[0] == TARGET}
    ct_tokens = ct["logit_tokens"].tolist()
    ours_rows = [lookup[ct_nodes[i]] for i in shared_features] + [targets[t] for t in ct_tokens]
    theirs_rows = list(shared_features) + [n_ct_features + (n_sites + 1) * n_pos + j for j in range(len(ct_tokens))]
    ours = graph.adjacency[torch.tensor(ours_rows)][:, torch.tensor(ours_index)].clone()
    ours[:, n_source_cols:] -= position[torch.tensor([receiver_row[r] for r in ours_rows])]
    theirs = ct["adjacency"].float()[torch.tensor(theirs_rows)][:, torch.tensor(theirs_index)]
    diff = (ours - theirs).abs()
    return float(diff.max()), float(diff[:, n_source_cols:].max()), len(shared_features)


def run_child(args: list[str], python: str = sys.executable, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed in {python}:\n{result.stderr[-4000:]}")
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["prepare", "fc", "fc64", "ct"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="small,gpt2,gemma", help="comma-separated: small, gpt2, gemma")
    parser.add_argument("--ct-python", default="/tmp/fc-graph-ct-venv/bin/python")
    parser.add_argument("--no-ct", action="store_true", help="featcircuits alone (no peer figures)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--per-token", type=int, default=100, help="active features per token per layer")
    parser.add_argument("--device", default="cpu", help="featcircuits' device (cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="featcircuits' model dtype (attribution is fp32 either way)")
    parser.add_argument("--quick", action="store_true", help="short prompts and small caps")
    parser.add_argument("--gemma64", action="store_true", help="also the 64-token Gemma-2-2B-shaped run")
    parser.add_argument("--gemma64-seconds", type=float, default=600)
    parser.add_argument("--gemma64-nodes", type=int, default=8192,
                        help="its max_feature_nodes (a smaller one where 8,192 does not fit this machine: the peak at "
                             "8,192 is then printed as the measured peak plus the rows it adds, 4 bytes a column each)")
    parser.add_argument("--gemma64-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="the 64-token run's model and transcoder dtype (attribution is fp32)")
    parser.add_argument("--gemma-d-mlp", type=int, default=2304)
    parser.add_argument("--n-pos", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-keep", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    SHAPES["gemma"]["d_mlp"] = args.gemma_d_mlp
    if args.step is not None:
        import torch

        torch.set_num_threads(args.threads)
        if args.step == "prepare":
            prepare(args.work, args.shape, args.n_pos, args.per_token, 0, "cpu")
        elif args.step == "fc":
            featcircuits_side(args.work, args.n_pos, args.n_keep, args.batch, args.device, args.dtype)
        elif args.step == "fc64":
            featcircuits_in_memory(args.shape, args.n_pos, args.n_keep, args.batch, args.per_token, args.dtype,
                                   args.seconds)
        else:
            circuit_tracer_side(args.work, args.n_pos, args.n_keep, args.batch)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible; run with --device cpu.")
    print(f"uptime: {os.popen('uptime').read().strip()}; threads={args.threads} device={args.device} "
          f"dtype={args.dtype} per_token={args.per_token}")
    speedups, diffs, ratios = [], [], []
    if args.gemma64:  # featcircuits alone, model and transcoders made in the child (no files)
        n_pos, n_keep, batch = 64, args.gemma64_nodes, 128
        fc = run_child(["fc64", "--shape", "gemma", "--threads", str(args.threads), "--gemma-d-mlp",
                        str(args.gemma_d_mlp), "--n-pos", str(n_pos), "--n-keep", str(n_keep), "--batch", str(batch),
                        "--per-token", str(args.per_token), "--dtype", args.gemma64_dtype,
                        "--seconds", str(args.gemma64_seconds)])
        label = f"gemma: {n_pos} tokens, max_feature_nodes={n_keep}, batch {batch}, {args.gemma64_dtype} weights"
        if "seconds" in fc:
            print(f"{label}: featcircuits {fc['seconds']:.0f}s, peak RSS {fc['peak_rss_gb']:.2f} GB "
                  f"({fc['n_active']} active features)")
        else:
            rows = fc["rows_done"]
            per_row = (fc["stopped_after_s"] - fc["first_row_s"]) / max(1, rows)
            print(f"{label}: featcircuits stopped after {fc['stopped_after_s']:.0f}s with {rows} of {n_keep + 10} rows "
                  f"({fc['n_active']} active features); peak RSS {fc['peak_rss_gb']:.2f} GB (model and transcoders "
                  f"{fc['rss_before_gb']:.2f} GB), estimate {fc['estimate_gb']:.2f} GB of which the final adjacency "
                  f"{fc['adjacency_gb']:.2f} GB comes after the rows; whole run ~{fc['first_row_s'] + per_row * (n_keep + 10):.0f}s "
                  f"extrapolated ({fc['first_row_s']:.0f}s to the first row); uptime {os.popen('uptime').read().strip()}")
        if n_keep < 8192:  # the rows of the features it left out: n_cols fp32 each, the only part growing with N
            n_cols = fc["n_active"] + (SHAPES["gemma"]["n_layers"] + 1) * n_pos  # one site per layer
            extra = (8192 - n_keep) * n_cols * 4 / 2**30
            print(f"gemma at max_feature_nodes=8192: peak RSS ~{fc['peak_rss_gb'] + extra:.2f} GB (measured "
                  f"{fc['peak_rss_gb']:.2f} GB at {n_keep} + {extra:.2f} GB of rows); time ~"
                  f"{fc['first_row_s'] + per_row * (8192 + 10):.0f}s at the measured time per row")
    plan = [(shape, *(QUICK if args.quick else RUNS)[shape]) for shape in args.shapes.split(",") if shape]
    for shape, n_pos, n_keep, batch in plan:
        work = Path(tempfile.mkdtemp(prefix=f"featcircuits-scale-{shape}-", dir=args.work))
        common = ["--shape", shape, "--threads", str(args.threads), "--gemma-d-mlp", str(args.gemma_d_mlp),
                  "--work", str(work), "--n-pos", str(n_pos)]
        run_child(["prepare", *common, "--per-token", str(args.per_token)])
        cap = ["--n-keep", str(n_keep), "--batch", str(batch)]
        fc = run_child(["fc", *common, *cap, "--device", args.device, "--dtype", args.dtype])
        label = f"{shape}: {n_pos} tokens, max_feature_nodes={n_keep}, batch {batch}"
        print(f"{label}: featcircuits {fc['seconds']:.2f}s, peak RSS {fc['peak_rss_gb']:.2f} GB "
              f"({fc['n_features']} of {fc['active']} active features)"
              + (f", CUDA peak {fc['cuda_peak_gb']:.2f} GB" if fc.get("cuda_peak_gb") is not None else ""))
        if args.no_ct:
            continue
        ct = run_child(["ct", *common, *cap], python=args.ct_python, threads=args.threads)
        max_diff, embed_diff, shared = compare(work)
        speedups.append(ct["seconds"] / fc["seconds"])
        diffs.append(max_diff)
        ratios.append(fc["peak_rss_gb"] / ct["peak_rss_gb"])
        print(f"{label}: circuit-tracer {ct['version']} {ct['seconds']:.2f}s, peak RSS {ct['peak_rss_gb']:.2f} GB "
              f"({ct['n_features']} of {ct['active']} active, BOS zeroed); {shared} features shared; "
              f"max_abs_diff {max_diff:.3g} (embedding columns {embed_diff:.3g}); speedup {speedups[-1]:.2f}x, "
              f"peak RSS ratio {ratios[-1]:.2f}; uptime {os.popen('uptime').read().strip()}")
    if speedups:
        print(f"speedup_vs_circuit_tracer={min(speedups):.2f} max_abs_diff={max(diffs):.3g} "
              f"peak_rss_ratio={max(ratios):.2f}")


if __name__ == "__main__":
    main()

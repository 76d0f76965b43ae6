"""End to end SAE training: featcircuits, sparsify and sae-lens on the same model, hook, token rows and settings.

Each library trains in its own subprocess from the same pre-tokenized rows (BOS + 128 tokens; BOS positions
dropped, so a batch of 32 rows is 4096 tokens): its own model forward, activation buffer and optimiser
steps, with the model already loaded. The parent times nothing itself: each child reports the wall time of
its library's training call and the parent reads the child's peak RSS from ``os.wait4``. The libraries run
alternately (``--repeats``), so load on the shared machine hits them alike; ranges are printed.

One evaluation then reads every library's trained weights (exported by each child as plain ``W_enc, b_enc,
W_dec, b_dec``) into one TopK evaluator written here, independent of all three: FVU, L0 and dead fraction
on held-out text (tinystories' validation excerpt), and CE loss recovered with the reconstruction spliced
into a Hugging Face forward of the model (``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, BOS positions kept).

Settings (the same for all): stories260k, SAE on ``blocks.2.hook_resid_pre`` (sparsify: output of
``layers.1``), TopK k 8, 512 latents, batch 4096 tokens, Adam lr 4e-4 (betas 0.9/0.999), AuxK 1/32. Each
library keeps its own schedule and initialisation, except that featcircuits' encoder starts at row norm
1/sqrt(3) (``init_scale``; its default 0.1 is too small for 73 steps at lr 4e-4) as sparsify's does. sparsify
runs its Adam option (its default sign-SGD takes no Adam lr). sae-lens runs TopK with
``use_sparse_activations`` on CPU (its fastest documented CPU setting) and decoder-norm rescaling off (which
that path needs, and which leaves weights that read as a plain TopK SAE).

    python benchmarks/train_end_to_end.py                        # 300k tokens, 2 repeats
    python benchmarks/train_end_to_end.py --tokens 2000000 --repeats 1
    python benchmarks/train_end_to_end.py --gpt2                 # also tokens/s on a GPT-2-small shape
    python benchmarks/train_end_to_end.py --device cuda --quick  # GPU smoke check

Last line: speedup_vs_sparsify=<x> speedup_vs_saelens=<y> fvu_ours=<a> fvu_sparsify=<b> fvu_saelens=<c>
(speedups from median tokens/s; FVU on held-out text).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
TEXT = SHARED / "data" / "tinystories"
LIBRARIES = ("featcircuits", "sparsify", "saelens")
CONTEXT = 129  # BOS + 128 tokens: 32 rows make one 4096-token batch once BOS is dropped


# -- data ----------------------------------------------------------------------------------------

def text_rows(tokenizer: Any, path: Path, context: int) -> torch.Tensor:
    """``[n, context]``: the file's stories tokenized, concatenated and cut into BOS + body rows."""
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    body = context - 1
    n = len(ids) // body
    rows = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), rows], 1)


def training_rows(base: torch.Tensor, n_rows: int, seed: int) -> torch.Tensor:
    """``n_rows`` rows: shuffled epochs over ``base`` (the excerpt is small, so a long run repeats it)."""
    generator = torch.Generator().manual_seed(seed)
    parts, have = [], 0
    while have < n_rows:
        parts.append(base[torch.randperm(len(base), generator=generator)])
        have += len(base)
    return torch.cat(parts)[:n_rows]


def write_rows(rows: torch.Tensor, path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).to_parquet(str(path))


# -- the children ---------------------------------------------------------------------------------

def export(path: Path, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
           subtract_b_dec: bool, k: int) -> None:
    """The common layout: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``; raw units."""
    from safetensors.torch import save_file

    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, str(path))
    path.with_suffix(".meta.json").write_text(json.dumps({"subtract_b_dec": subtract_b_dec, "k": k}))


def child_featcircuits(job: dict[str, Any]) -> tuple[float, int]:
    from featcircuits.models import load_model
    from featcircuits.training import TrainConfig, run_training
    from featcircuits.training import api as training_api

    model = load_model(job["model"], device=job["device"])
    training_api._load_model = lambda config, device: model  # the model is loaded before the clock starts
    config = TrainConfig(
        hooks=[job["hook"]], model=job["model"], dataset=job["rows"], out=job["out"], architecture="topk",
        k=job["k"], d_sae=job["d_sae"], total_tokens=job["tokens"], batch_size=job["batch_size"], lr=job["lr"],
        context_size=CONTEXT, model_batch_size=job["batch_size"] // (CONTEXT - 1), eval_sequences=0,
        # encoder rows start at norm 1/sqrt(3), the scale of PyTorch's default Linear init that sparsify starts
        # from (the library default, 0.1, leaves a 300k-token run at lr 4e-4 too few steps to grow the encoder)
        init_scale=3**-0.5, auxk_coefficient=1 / 32, progress=False, device=job["device"], seed=job["seed"], overwrite=True,
    )
    started = time.perf_counter()
    result = run_training(config)
    seconds = time.perf_counter() - started
    (dictionary,) = result["dictionaries"]
    export(Path(job["weights"]), dictionary.W_enc, dictionary.b_enc, dictionary.W_dec, dictionary.b_dec,
           dictionary.cfg.apply_b_dec_to_input, job["k"])
    return seconds, int(result["tokens"])


def child_sparsify(job: dict[str, Any]) -> tuple[float, int]:
    import datasets
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["hf_model"], dtype=torch.float32).to(job["device"]).eval()
    rows_per_batch = job["batch_size"] // (CONTEXT - 1)
    n_rows = job["tokens"] // job["batch_size"] * rows_per_batch
    dataset = datasets.Dataset.from_parquet(job["rows"]).select(range(n_rows)).with_format("torch")
    from sparsify.utils import get_layer_list

    layers_name, _ = get_layer_list(model)  # "layers" (Llama), "h" (GPT-2)
    layer = int(job["hook"].split(".")[1]) - 1  # blocks.L.hook_resid_pre is the output of decoder layer L-1
    config = TrainConfig(
        SaeConfig(k=job["k"], num_latents=job["d_sae"]), batch_size=rows_per_batch, optimizer="adam", lr=job["lr"],
        lr_warmup_steps=0, auxk_alpha=1 / 32, exclude_tokens=[job["bos"]], hookpoints=[f"{layers_name}.{layer}"],
        log_to_wandb=False, save_every=10**9, save_dir=job["out"], init_seeds=[job["seed"]],
    )
    started = time.perf_counter()
    trainer = Trainer(config, dataset, model)
    trainer.fit()
    seconds = time.perf_counter() - started
    (sae,) = trainer.saes.values()
    export(Path(job["weights"]), sae.encoder.weight.t(), sae.encoder.bias, sae.W_dec, sae.b_dec, True, job["k"])
    return seconds, n_rows * (CONTEXT - 1)


def child_saelens(job: dict[str, Any]) -> tuple[float, int]:
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from featcircuits.models import load_model

    model = load_model(job["model"], device=job["device"])
    dataset = datasets.Dataset.from_parquet(job["rows"])
    sparse = job["device"] == "cpu"  # sae-lens: sparse activations pay only in float32 on CPU
    config = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=job["d_in"], d_sae=job["d_sae"], k=job["k"], use_sparse_activations=sparse,
                                  rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1 / 32,
                                  apply_b_dec_to_input=True, dtype="float32", device=job["device"]),
        model_name="stories260k", hook_name=job["hook"], dataset_path="benchmark-rows", is_dataset_tokenized=True,
        streaming=False, context_size=CONTEXT, prepend_bos=False, exclude_special_tokens=[job["bos"]],
        training_tokens=job["tokens"], train_batch_size_tokens=job["batch_size"],
        store_batch_size_prompts=job["batch_size"] // (CONTEXT - 1), lr=job["lr"], device=job["device"],
        seed=job["seed"], logger=LoggingConfig(log_to_wandb=False), output_path=None, checkpoint_path=None,
        n_checkpoints=0, verbose=False, n_eval_batches=0,
        # its mixing buffer holds n_batches_in_buffer * context_size rows: 256 -> 33k rows, 8 batches
        n_batches_in_buffer=256,
    )
    started = time.perf_counter()
    sae = LanguageModelSAETrainingRunner(config, override_dataset=dataset, override_model=model).run()
    seconds = time.perf_counter() - started
    W_enc, b_enc, W_dec, b_dec = (torch.as_tensor(getattr(sae, name)) for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    export(Path(job["weights"]), W_enc, b_enc, W_dec, b_dec, True, job["k"])
    return seconds, job["tokens"] // job["batch_size"] * job["batch_size"]


CHILDREN = {"featcircuits": child_featcircuits, "sparsify": child_sparsify, "saelens": child_saelens}


def child_main(library: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    seconds, tokens = CHILDREN[library](job)
    Path(job["report"]).write_text(json.dumps({"seconds": seconds, "tokens": tokens}))


def run_child(library: str, job: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    """Run one library in a fresh process; its report plus peak RSS (bytes) from the kernel."""
    job = {**job, "out": str(work / f"out-{tag}"), "weights": str(work / f"{tag}.safetensors"),
           "report": str(work / f"{tag}.json")}
    job_path = work / f"{tag}-job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    log_path = work / f"{tag}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, __file__, "--child", library, str(job_path)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own resource usage (peak RSS), not every child's maximum.
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{library} failed (exit {process.returncode}):\n{log_path.read_text()[-4000:]}")
    report = json.loads(Path(job["report"]).read_text())
    report["weights"] = job["weights"]
    report["rss"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    return report


# -- the one evaluation ---------------------------------------------------------------------------

def load_exported(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(path)
    return {**weights, **json.loads(Path(path).with_suffix(".meta.json").read_text())}


def topk_reconstruct(sae: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, d_in]`` -> (reconstruction ``[n, d_in]``, feature activations ``[n, d_sae]``)."""
    centred = x - sae["b_dec"] if sae["subtract_b_dec"] else x
    pre = centred @ sae["W_enc"] + sae["b_enc"]
    values, indices = pre.topk(sae["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return acts @ sae["W_dec"] + sae["b_dec"], acts


@torch.no_grad()
def evaluate(hf_model: Any, layer: int, sae: dict[str, Any], tokens: torch.Tensor, bos: int) -> dict[str, float]:
    """FVU, L0, dead fraction and CE loss recovered of ``sae`` on ``tokens [n, ctx]`` at decoder layer ``layer``'s
    output, through a forward hook on the Hugging Face model."""
    keep = tokens != bos
    captured: dict[str, torch.Tensor] = {}
    mode = {"value": "clean"}

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.setdefault("x", hidden.detach().clone())
        if mode["value"] == "clean":
            return None
        replaced = hidden.clone()
        if mode["value"] == "zero":
            replaced[keep] = 0.0
        else:
            replaced[keep] = topk_reconstruct(sae, hidden[keep])[0]
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    handle = hf_model.model.layers[layer].register_forward_hook(hook)
    try:
        losses = {}
        for name in ("clean", "zero", "sae"):
            mode["value"] = name
            logits = hf_model(tokens).logits[:, :-1].float()
            losses[name] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    finally:
        handle.remove()
    x = captured["x"][keep]
    reconstruction, acts = topk_reconstruct(sae, x)
    fvu = ((reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return {
        "fvu": fvu, "l0": (acts > 0).float().sum(-1).mean().item(),
        "dead": ((acts > 0).sum(0) == 0).float().mean().item(),
        "ce_recovered": (losses["zero"] - losses["sae"]) / (losses["zero"] - losses["clean"]),
        "ce_clean": losses["clean"], "ce_sae": losses["sae"],
    }


# -- the parent -----------------------------------------------------------------------------------

def gpt2_shaped_model(work: Path) -> Path:
    """A random-weight GPT-2-small-shaped checkpoint (12 layers, d_model 768, 12 heads, vocab 50257) in
    Hugging Face layout, with stories260k's tokenizer (its ids lie inside GPT-2's vocabulary)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    path = work / "gpt2-small-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, path / name)
    return path


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if len(values) == 1 or fmt.format(low) == fmt.format(high) else \
        f"{fmt.format(low)}-{fmt.format(high)}"


def run_comparison(repeats: int, work: Path, job: dict[str, Any], label: str,
                   libraries: list[str]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {library: [] for library in libraries}
    for repeat in range(repeats):
        for library in libraries:  # alternating, so load on the shared machine hits each library alike
            report = run_child(library, job, work, f"{label}-{library}-{repeat}")
            runs[library].append(report)
            print(f"  [{label}] {library} repeat {repeat}: {report['tokens']:,} tokens in {report['seconds']:.1f} s "
                  f"= {report['tokens'] / report['seconds']:,.0f} tok/s, peak RSS {report['rss'] / 2**30:.2f} GB "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description="End to end SAE training: featcircuits, sparsify and sae-lens.")
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens (e.g. 300000, 2000000)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each library")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small run for a smoke check (40k tokens, 1 repeat)")
    parser.add_argument("--gpt2", action="store_true", help="also tokens/s on a random GPT-2-small-shaped model")
    parser.add_argument("--gpt2-tokens", type=int, default=0, help="GPT-2 run tokens (0: 16k on CPU, 400k on CUDA)")
    parser.add_argument("--gpt2-repeats", type=int, default=1, help="alternating GPT-2 runs of each library")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 40_960), 1
    libraries = [name for name in args.libraries.split(",") if name]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(STORIES))
    bos = int(tokenizer.bos_token_id)
    base = text_rows(tokenizer, TEXT / "train_head.txt", CONTEXT)
    held_out = text_rows(tokenizer, TEXT / "valid_head.txt", CONTEXT)
    batch_size, hook = 4096, "blocks.2.hook_resid_pre"
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"stories260k {hook}: TopK k=8 d_sae=512 batch={batch_size} lr=4e-4 tokens={args.tokens:,} "
          f"context={CONTEXT} (BOS dropped) device={args.device} threads={args.threads or torch.get_num_threads()} "
          f"repeats={args.repeats}; train text {len(base)} rows, held-out {len(held_out)} rows")
    with tempfile.TemporaryDirectory(prefix="fc-e2e-") as tmp:
        work = Path(tmp)
        rows_path = work / "rows.parquet"
        n_rows = (args.tokens // batch_size + 2) * (batch_size // (CONTEXT - 1)) * 2  # sae-lens reads ahead
        write_rows(training_rows(base, n_rows, args.seed), rows_path)
        job = {"model": str(STORIES), "hf_model": str(STORIES), "rows": str(rows_path), "hook": hook, "k": 8,
               "d_sae": 512, "d_in": 64, "batch_size": batch_size, "lr": 4e-4, "tokens": args.tokens,
               "device": args.device, "threads": args.threads, "seed": args.seed, "bos": bos}
        runs = run_comparison(args.repeats, work, job, "stories", libraries)
        hf_model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
        quality = {lib: evaluate(hf_model, 1, load_exported(runs[lib][-1]["weights"]), held_out, bos)
                   for lib in libraries}
        print_stories_table(args, runs, quality)
        gpt2_runs: dict[str, list[dict[str, Any]]] = {}
        if args.gpt2:
            gpt2 = gpt2_shaped_model(work)
            gpt2_tokens = args.gpt2_tokens or (16_384 if args.device == "cpu" else 409_600)
            gpt2_rows = work / "gpt2-rows.parquet"
            generator = torch.Generator().manual_seed(args.seed)
            random_rows = torch.randint(3, 50257, (n_rows_for(gpt2_tokens, batch_size), CONTEXT), generator=generator)
            random_rows[:, 0] = bos
            write_rows(random_rows, gpt2_rows)
            gpt2_job = {**job, "model": str(gpt2), "hf_model": str(gpt2), "rows": str(gpt2_rows),
                        "hook": "blocks.6.hook_resid_pre", "k": 32, "d_sae": 16384, "d_in": 768,
                        "tokens": gpt2_tokens}
            print(f"GPT-2-small-shaped random model, blocks.6.hook_resid_pre: TopK k=32 d_sae=16384 "
                  f"batch={batch_size} tokens={gpt2_tokens:,}")
            gpt2_runs = run_comparison(args.gpt2_repeats, work, gpt2_job, "gpt2", libraries)
    print_tables(args, runs, quality, gpt2_runs)


def n_rows_for(tokens: int, batch_size: int) -> int:
    return (tokens // batch_size + 2) * (batch_size // (CONTEXT - 1)) * 2


def rates(reports: list[dict[str, Any]]) -> list[float]:
    return [r["tokens"] / r["seconds"] for r in reports]


def print_stories_table(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
                        quality: dict[str, dict[str, float]]) -> None:
    print(f"\nstories260k, {args.tokens:,} tokens, {args.repeats} alternating run(s) each "
          f"(load now {os.getloadavg()[0]:.2f}); quality of each library's last run on held-out text")
    print("| library | tokens/s | wall s | FVU | L0 | dead | CE loss recovered | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for library, reports in runs.items():
        q = quality[library]
        print(f"| {library} | {spread(rates(reports))} | {spread([r['seconds'] for r in reports], '{:.1f}')} | "
              f"{q['fvu']:.3f} | {q['l0']:.1f} | {q['dead']:.1%} | {q['ce_recovered']:.3f} | "
              f"{spread([r['rss'] / 2**30 for r in reports], '{:.2f}')} GB |")


def print_tables(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], quality: dict[str, dict[str, float]],
                 gpt2_runs: dict[str, list[dict[str, Any]]]) -> None:
    if gpt2_runs:
        print("\nGPT-2-small-shaped random model (12 layers, d_model 768), TopK k=32, 16384 latents")
        print("| library | tokens/s | wall s | peak RSS |")
        print("|---|---|---|---|")
        for library, reports in gpt2_runs.items():
            print(f"| {library} | {spread(rates(reports))} | {spread([r['seconds'] for r in reports], '{:.1f}')} | "
                  f"{spread([r['rss'] / 2**30 for r in reports], '{:.2f}')} GB |")
    median = {library: statistics.median(rates(reports)) for library, reports in runs.items()}
    ours = median.get("featcircuits", float("nan"))

    def ratio(library: str) -> str:
        return f"{ours / median[library]:.2f}" if library in median else "nan"

    def fvu(library: str) -> str:
        return f"{quality[library]['fvu']:.4f}" if library in quality else "nan"

    print(f"speedup_vs_sparsify={ratio('sparsify')} speedup_vs_saelens={ratio('saelens')} "
          f"fvu_ours={fvu('featcircuits')} fvu_sparsify={fvu('sparsify')} fvu_saelens={fvu('saelens')}")


if __name__ == "__main__":
    main()

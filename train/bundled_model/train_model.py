"""Train the bundled model: a 4-layer Llama-architecture transformer on the standard library's source.

Plain torch training loop over ``transformers.LlamaForCausalLM`` built from a config. Training windows
are random slices of the tokenized training split, each starting with BOS (as every prompt does at
inference). Deterministic for a given seed and thread count; checkpoints (model, optimizer, step, RNG
state) are written atomically every ``--ckpt-every`` steps so an interrupted or longer run resumes.

Usage (CPU, one thread, in the background)::

    nohup python -m train.bundled_model.train_model --out featcircuits/pretrained/bundled --steps 4000 --warmup 150 \
        --docstrings-from 3000 --induction-from 3000 > runs/bundled_train.log 2>&1 &

``--out`` must already hold the tokenizer (see train_tokenizer.py); the model is saved beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from train.bundled_model.build_corpus import FILE_SEPARATOR


@dataclass
class TrainConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 384
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 4000
    lr: float = 3e-3
    min_lr_frac: float = 0.05
    decay_frac: float = 0.25
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    eval_every: int = 250
    ckpt_every: int = 250
    eval_batches: int = 20
    # From this step on (-1: never), this fraction of each batch's windows comes from the derived
    # ``:param`` docstrings (train/bundled_model/docstrings.py) instead of the plain training split.
    docstrings_from: int = -1
    docstrings_fraction: float = 0.25
    # From this step on (-1: never), this fraction of each batch's windows are synthetic repeats: a random
    # sequence of token ids repeated to fill the window. Natural source code repeats mostly frequent
    # tokens, which leaves copying of rare tokens (plain induction on arbitrary ids) undertrained.
    induction_from: int = -1
    induction_fraction: float = 0.125
    induction_min_len: int = 8
    induction_max_len: int = 64


def llama_config(vocab_size: int, bos_id: int, cfg: TrainConfig):
    """The Hugging Face config of the bundled model (tied input/output embeddings to save space)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=bos_id,
        pad_token_id=bos_id,
    )


def tokenize_split(tokenizer, text_file: Path, cache: Path) -> torch.Tensor:
    """Token ids of a whole split, ``[n_tokens]`` int16-safe ``int32``; cached beside the text."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    text = text_file.read_text(encoding="utf-8")
    ids: list[int] = []
    # Encode file by file (the separator is the BOS token) so no token crosses a file boundary.
    bos = tokenizer.convert_tokens_to_ids(FILE_SEPARATOR)
    for doc in text.split(FILE_SEPARATOR):
        ids.append(bos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    tokens = torch.tensor(ids, dtype=torch.int32)
    torch.save(tokens, cache)
    return tokens


def sample_batch(tokens: torch.Tensor, bos: int, cfg: TrainConfig, gen: torch.Generator,
                 n: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` (default ``batch_size``) windows at random offsets, each with BOS in front of
    ``seq_len - 1`` tokens."""
    n = cfg.batch_size if n is None else n
    starts = torch.randint(0, len(tokens) - cfg.seq_len, (n,), generator=gen)
    offsets = torch.arange(cfg.seq_len - 1)
    body = tokens[starts[:, None] + offsets].long()
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


def repeat_windows(n: int, bos: int, vocab_size: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """``[n, seq_len]`` synthetic induction windows: BOS, then a sequence of ``induction_min_len`` to
    ``induction_max_len`` ids drawn uniformly from the non-BOS vocabulary, repeated until the window is full."""
    lengths = torch.randint(cfg.induction_min_len, cfg.induction_max_len + 1, (n,), generator=gen)
    ids = torch.randint(0, vocab_size - 1, (n, cfg.induction_max_len), generator=gen)
    ids = ids + (ids >= bos).long()  # skip BOS: it marks a document start everywhere else
    positions = torch.arange(cfg.seq_len - 1)
    body = ids.gather(1, positions[None, :] % lengths[:, None])
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


def training_batch(train_tokens: torch.Tensor, doc_tokens: torch.Tensor | None, bos: int, cfg: TrainConfig,
                   gen: torch.Generator, step: int, vocab_size: int = 0) -> torch.Tensor:
    """The batch of ``step``: plain training windows, with ``docstrings_fraction`` of them drawn from the
    derived docstrings once ``step >= docstrings_from`` and ``induction_fraction`` of them synthetic
    repeats (``repeat_windows``) once ``step >= induction_from``."""
    parts = []
    if doc_tokens is not None and 0 <= cfg.docstrings_from <= step:
        parts.append(sample_batch(doc_tokens, bos, cfg, gen, round(cfg.docstrings_fraction * cfg.batch_size)))
    if 0 <= cfg.induction_from <= step:
        parts.append(repeat_windows(round(cfg.induction_fraction * cfg.batch_size), bos, vocab_size, cfg, gen))
    n_plain = cfg.batch_size - sum(len(p) for p in parts)
    return torch.cat([*parts, sample_batch(train_tokens, bos, cfg, gen, n_plain)])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant ``lr``, then linear decay to ``min_lr_frac * lr``
    over the last ``decay_frac`` of ``steps``.

    The constant phase does not depend on ``steps``, so a run resumed with a different ``--steps``
    (before its decay began) follows exactly the schedule a fresh run with that ``--steps`` would.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = _decay_start(cfg.steps, cfg)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
    return cfg.lr * (1 - (1 - cfg.min_lr_frac) * progress)


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, bos: int, cfg: TrainConfig) -> float:
    """Mean next-token loss on ``eval_batches`` fixed windows of ``tokens`` (same windows every call)."""
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [model(input_ids=(b := sample_batch(tokens, bos, cfg, gen)), labels=b).loss.item()
              for _ in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def _decay_start(steps: int, cfg: TrainConfig) -> int:
    return int(steps * (1 - cfg.decay_frac))


def _resumable_checkpoint(ckpt_path: Path, stable_path: Path, cfg: TrainConfig) -> dict | None:
    """The checkpoint to resume from: the latest one when its schedule equals ``cfg``'s so far, else the
    last constant-LR one when that lies before ``cfg``'s decay, else an error naming the fix."""
    if not ckpt_path.exists():
        return None
    ckpt = torch.load(ckpt_path, weights_only=True)
    if ckpt["steps"] == cfg.steps or ckpt["step"] <= min(_decay_start(ckpt["steps"], cfg),
                                                         _decay_start(cfg.steps, cfg)):
        return ckpt
    if stable_path.exists():
        stable = torch.load(stable_path, weights_only=True)
        if stable["step"] <= _decay_start(cfg.steps, cfg):
            print(f"{ckpt_path} is in the decay phase of a {ckpt['steps']}-step run; branching from the "
                  f"constant-LR checkpoint at step {stable['step']}", flush=True)
            return stable
    raise ValueError(
        f"{ckpt_path} (step {ckpt['step']} of a {ckpt['steps']}-step run) has a learning-rate schedule that "
        f"differs from --steps {cfg.steps}; resume with --steps {ckpt['steps']}, or train afresh with another --work."
    )


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out_dir: Path, corpus: Path, work: Path, cfg: TrainConfig) -> dict:
    """Train (or resume) and save the model to ``out_dir``; return the final metrics."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    bos = tokenizer.convert_tokens_to_ids(FILE_SEPARATOR)
    train_tokens = tokenize_split(tokenizer, corpus / "train.txt", work / "train_tokens.pt")
    valid_tokens = tokenize_split(tokenizer, corpus / "valid.txt", work / "valid_tokens.pt")
    doc_tokens = None
    if cfg.docstrings_from >= 0:
        doc_file = corpus / "train_docstrings.txt"
        if not doc_file.exists():
            raise FileNotFoundError(f"--docstrings-from needs {doc_file}; write it with "
                                    f"`python -m train.bundled_model.docstrings --corpus {corpus}`.")
        doc_tokens = tokenize_split(tokenizer, doc_file, work / "train_docstrings_tokens.pt")
    print(f"tokens: train {len(train_tokens):,} valid {len(valid_tokens):,}"
          + (f" derived docstrings {len(doc_tokens):,}" if doc_tokens is not None else ""), flush=True)

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(len(tokenizer), bos, cfg))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    ckpt_path, stable_path = work / "checkpoint.pt", work / "checkpoint_stable.pt"
    ckpt = _resumable_checkpoint(ckpt_path, stable_path, cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, elapsed, history = ckpt["step"], ckpt["elapsed"], ckpt["history"]
        print(f"resumed at step {step}", flush=True)
    print(f"params {n_params:,}; config {json.dumps(asdict(cfg))}", flush=True)

    model.train()
    t0 = time.time() - elapsed
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = training_batch(train_tokens, doc_tokens, bos, cfg, gen, step, len(tokenizer))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step, cfg):.2e} "
                  f"elapsed {time.time() - t0:.0f}s", flush=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = eval_loss(model, valid_tokens, bos, cfg)
            history.append({"step": step, "train_loss": loss.item(), "valid_loss": v,
                            "elapsed_s": time.time() - t0})
            print(f"eval step {step} valid_loss {v:.4f}", flush=True)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                     "step": step, "steps": cfg.steps, "elapsed": time.time() - t0, "history": history}
            _atomic_save(state, ckpt_path)
            if step <= _decay_start(cfg.steps, cfg):
                _atomic_save(state, stable_path)  # the last point a longer run can branch from

    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    metrics = {
        "params": n_params, "steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_tokens": len(train_tokens), "valid_tokens": len(valid_tokens),
        "final_valid_loss": history[-1]["valid_loss"] if history else None,
        "wall_s": time.time() - t0, "threads": cfg.threads, "config": asdict(cfg), "history": history,
    }
    (work / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("featcircuits/pretrained/bundled"))
    parser.add_argument("--corpus", type=Path, default=Path("runs/bundled_corpus"))
    parser.add_argument("--work", type=Path, default=Path("runs/bundled_run"), help="token cache, checkpoints")
    for name, field in TrainConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    if not (args.out / "tokenizer.json").exists():
        parser.error(f"{args.out} has no tokenizer.json; run train.bundled_model.train_tokenizer first.")
    train(args.out, args.corpus, args.work, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

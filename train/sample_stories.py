"""Sample in-distribution training text from a model, for dictionaries whose real corpus is too small.

    OMP_NUM_THREADS=1 python -m train.sample_stories --tokens 1500000 \\
        --append ../shared/data/tinystories/train_head.txt --out runs/stories260k_sampled.txt

Stories are sampled from BOS at temperature 1 (no top-k or top-p, so the text follows the model's own
distribution), in batches through ``transformers``' ``generate`` with its KV cache, each cut at the first
EOS or BOS, and written one per paragraph (blank-line separated, as the trainer's text reader expects).
``--append`` adds a real text file after them: the trainer holds out the last sequences of its dataset
for the spliced CE/KL evaluation, so those stay real text. Seeded: the same arguments write the same file
(on the same torch build and thread count).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def sample_stories(model_dir: str | Path, n_tokens: int, seed: int = 0, batch_size: int = 64,
                   max_new_tokens: int = 256, temperature: float = 1.0) -> list[str]:
    """At least ``n_tokens`` tokens of stories (fewer only if the model keeps emitting empty ones)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stops = {tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    torch.manual_seed(seed)
    stories: list[str] = []
    written, empty_batches = 0, 0
    while written < n_tokens and empty_batches < 3:
        start = torch.full((batch_size, 1), tokenizer.bos_token_id)
        with torch.no_grad():
            generated = model.generate(start, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                       max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.eos_token_id)
        before = written
        for row in generated[:, 1:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            text = tokenizer.decode(row[:cut]).replace("\n", " ").strip()
            if text:
                stories.append(text)
                written += cut
        empty_batches = empty_batches + 1 if written == before else 0
    return stories


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/stories260k")
    parser.add_argument("--tokens", type=int, required=True, help="tokens of sampled text to write")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", type=Path, help="a real text file written after the samples (held out last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.append is not None and not args.append.is_file():
        parser.error(f"--append {args.append} is not a file.")
    torch.set_num_threads(1)
    start = time.time()
    stories = sample_stories(args.model, args.tokens, args.seed, args.batch_size, args.max_new_tokens)
    text = "\n\n".join(stories)
    if args.append is not None:
        text += "\n\n" + args.append.read_text(encoding="utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(stories)} stories to {args.out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the bundled model's byte-level BPE tokenizer on the corpus' training split.

Byte-level BPE (GPT-2's pre-tokenizer) covers every byte, so no text is ever unknown. One special
token, ``<|endoftext|>`` (id 0), is BOS, EOS, padding and the file separator, and the post-processor
prepends it, so ``tokenizer(text)`` and TransformerLens' ``to_tokens`` start every sequence with BOS.

Usage::

    python -m train.bundled_model.train_tokenizer --corpus runs/bundled_corpus --out featcircuits/pretrained/bundled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from train.bundled_model.build_corpus import FILE_SEPARATOR

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 256


def train_tokenizer(train_file: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE on ``train_file`` (files joined by ``<|endoftext|>``); deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[FILE_SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    bos_id = tok.token_to_id(FILE_SEPARATOR)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{FILE_SEPARATOR} $A",
                pair=f"{FILE_SEPARATOR} $A {FILE_SEPARATOR} $B",
                special_tokens=[(FILE_SEPARATOR, bos_id)],
            ),
        ]
    )
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json in Hugging Face layout."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=FILE_SEPARATOR,
        eos_token=FILE_SEPARATOR,
        pad_token=FILE_SEPARATOR,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    special = {"bos_token": FILE_SEPARATOR, "eos_token": FILE_SEPARATOR, "pad_token": FILE_SEPARATOR}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/bundled_corpus"))
    parser.add_argument("--out", type=Path, default=Path("featcircuits/pretrained/bundled"))
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.corpus / "train.txt", args.vocab_size)
    save_hf_tokenizer(tok, args.out)
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared fixtures: the real stories260k checkpoint and tiny config-built models."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260k"
TINYSTORIES = SHARED / "data" / "tinystories"

TINY_GPT2_CONFIG = dict(
    n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=97,
    act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
)
TINY_LLAMA_CONFIG = dict(
    n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48, n_ctx=64, d_vocab=97,
    act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
    gated_mlp=True, final_rms=True, rotary_adjacent_pairs=False,
)


def random_token_task(model, n: int, length: int, seed: int):
    """A ContrastiveTask of ``n`` pairs of random token prompts (ids < 97, the tiny models' vocabulary) of
    ``length`` tokens; answer 3, distractor 5."""
    from featcircuits.circuits import ContrastiveTask

    generator = torch.Generator().manual_seed(seed)
    pairs = [{"clean": torch.randint(0, 97, (length,), generator=generator).tolist(),
              "corrupt": torch.randint(0, 97, (length,), generator=generator).tolist(),
              "answer": 3, "distractor": 5} for _ in range(n)]
    return ContrastiveTask.from_pairs(model, pairs)


def prefix_sharing_task(model, shapes=((9, 4), (7, 3), (9, 6), (8, 5))):
    """Pairs of unequal lengths (right-padded) whose clean and corrupt prompts share unequal prefixes: per pair
    ``(length, first position where clean and corrupt differ)``; answer 3, distractor 5."""
    from featcircuits.circuits import ContrastiveTask

    generator = torch.Generator().manual_seed(3)
    pairs = []
    for length, first_difference in shapes:
        clean = torch.randint(0, 97, (length,), generator=generator)
        corrupt = clean.clone()
        corrupt[first_difference:] = torch.randint(0, 97, (length - first_difference,), generator=generator)
        pairs.append({"clean": clean.tolist(), "corrupt": corrupt.tolist(), "answer": 3, "distractor": 5})
    return ContrastiveTask.from_pairs(model, pairs)


@torch.no_grad()
def mean_ablated_mlps_by_hand(model, task) -> float:
    """Every MLP output set to its per-position mean over the clean prompts that reach that position (each
    prompt run alone, at its own length), with plain transformer_lens hooks."""
    prompts = [task.clean_tokens[i, : int(task.clean_last[i]) + 1] for i in range(len(task))]
    names = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)]
    caches = [model.run_with_cache(p[None], names_filter=names)[1] for p in prompts]
    width = max(len(p) for p in prompts)
    means = {}
    for name in names:
        total = torch.zeros(width, model.cfg.d_model)
        count = torch.zeros(width, 1)
        for cache in caches:
            length = cache[name].shape[1]
            total[:length] += cache[name][0]
            count[:length] += 1
        means[name] = total / count
    diffs = []
    for index, tokens in enumerate(prompts):
        hooks = [(name, lambda x, hook, m=means[name]: m[: x.shape[1]].expand_as(x)) for name in names]
        last = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]
        diffs.append(float(last[task.answers[index]] - last[task.distractors[index]]))
    return sum(diffs) / len(diffs)


@contextlib.contextmanager
def unprivileged(active: bool = True):
    """Root writes through any permission bits: run the block with nobody's effective uid (restored after), so
    that a read-only path is read-only for the code under test too."""
    if not active or os.geteuid() != 0:
        yield
        return
    import importlib
    import pkgutil

    import featcircuits
    from featcircuits.cli import build_parser

    # everything the code under test may import is loaded first: nobody may not read a private checkout
    for info in pkgutil.walk_packages(featcircuits.__path__, "featcircuits."):
        if ".pretrained" not in info.name:
            importlib.import_module(info.name)
    build_parser()
    blocked = [str(path) for path in (Path(featcircuits.__file__).parent, *Path(featcircuits.__file__).parents)
               if path.is_dir() and not os.stat(path).st_mode & 0o001]
    if blocked:
        pytest.skip(f"the checkout lies under {blocked[0]}, which nobody may not enter, so a read-only path cannot "
                    "be tested as another user here")
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def relu_transcoders(model, d_sae: int = 48, bias: float = -0.2, seed: int = 0) -> list:
    """Random-init ReLU transcoders at every layer of ``model`` (encoder bias ``bias``: some features fire)."""
    from featcircuits import Dictionary, DictionaryConfig

    torch.manual_seed(seed)
    out = []
    for layer in range(model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=d_sae, kind="transcoder", activation="relu",
                               hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
        dictionary = Dictionary.from_config(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_(bias)
        out.append(dictionary)
    return out


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES260K / "config.json").exists():
        pytest.fail(f"stories260k is expected at {STORIES260K} (the shared/ folder beside the checkout).")
    return STORIES260K


@pytest.fixture(scope="session")
def stories_model(stories_path):
    from featcircuits import load_model

    return load_model(stories_path)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from featcircuits import load_model

    return load_model(TINY_GPT2_CONFIG, seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    from featcircuits import load_model

    return load_model(TINY_LLAMA_CONFIG, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models on a shared 2-core machine run several times faster single-threaded; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""EleutherAI sparsify's layout (read only): one directory per hookpoint with ``cfg.json`` + ``sae.safetensors``.

As ``SparseCoder.save_to_disk`` writes it (eai-sparsify 1.3.3, ``sparsify/sparse_coder.py``)::

    <run>/config.json                 the training run (``model``, ``dataset``, ...), optional
    <run>/<hookpoint>/cfg.json        activation (topk | groupmax), k, num_latents or expansion_factor,
                                      transcode, skip_connection, d_in, ...
    <run>/<hookpoint>/sae.safetensors encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in],
                                      b_dec [d_in], W_skip [d_in, d_in] (used as x @ W_skip.T), optional

An SAE subtracts ``b_dec`` before encoding; a transcoder (``transcode``) does not. Features are
``topk(relu(x @ W.T + b))``, which equals featcircuits' TopK. The hookpoint is a module path of the Hugging
Face model (``layers.3``, ``layers.3.mlp``, ``gpt_neox.layers.3``); it maps to TransformerLens hooks: a
layer's output is ``blocks.L.hook_resid_post``, an MLP's output ``blocks.L.hook_mlp_out`` and its input
``blocks.L.ln2.hook_normalized`` (before the norm's weight in an unprocessed TransformerLens model, while
sparsify reads it after; the raw hookpoint is kept in ``cfg.extra["sparsify_hookpoint"]``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..base import Dictionary
from ..config import DictionaryConfig
from .common import DICTIONARY_NONFINITE_FIX, read_json, read_tensors

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
_HOOKPOINT = re.compile(r"^(?:[\w.]*?\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hooks_for(hookpoint: str, transcode: bool) -> tuple[str, str, int | None]:
    """(hook_in, hook_out, layer) in TransformerLens names for a sparsify hookpoint (a module path)."""
    match = _HOOKPOINT.match(hookpoint)
    if not match:
        return hookpoint, hookpoint, None
    layer, module = int(match.group(1)), match.group(2)
    if module is None:  # the whole block: reads its input, writes its output
        output, input_ = f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_pre"
    elif module == "mlp":
        output, input_ = f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.ln2.hook_normalized"
    else:
        output, input_ = f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.ln1.hook_normalized"
    return (input_ if transcode else output), output, layer


def _run_config(path: Path) -> dict[str, Any]:
    run = path.parent / RUN_CONFIG_FILE
    if not run.is_file():
        return {}
    try:
        return read_json(run)
    except ValueError:
        return {}  # provenance only; a broken run config must not block reading the weights


def load(path: Path, device: str | torch.device = "cpu") -> list[Dictionary]:
    source = path / CONFIG_FILE
    data = read_json(source)
    # sparsify writes d_in, k and the width; their absence means an incomplete file, not a default.
    # (activation and transcode are absent from files of sparsify versions that only had TopK SAEs.)
    missing = [key for key in ("d_in", "k") if key not in data]
    if not data.get("num_latents") and "expansion_factor" not in data:
        missing.append("num_latents (or expansion_factor)")
    if missing:
        raise ValueError(f"{source} lacks {missing}; it is not a complete sparsify sparse-coder config.")
    activation = data.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{source} has activation {activation!r}; featcircuits reads sparsify's 'topk' coders "
                         "(GroupMax has no featcircuits equivalent).")
    d_in = int(data["d_in"])
    d_sae = int(data.get("num_latents") or 0) or d_in * int(data.get("expansion_factor", 32))
    transcode, skip = bool(data.get("transcode", False)), bool(data.get("skip_connection", False))
    if skip and not transcode:
        raise ValueError(f"{source} describes an SAE with a skip connection, which featcircuits' SAE lacks; "
                         "only transcoders may have W_skip.")
    weights = path / WEIGHTS_FILE
    required = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if skip:
        required["W_skip"] = (d_in, d_in)
    tensors = read_tensors(weights, required, device=device, nonfinite_fix=DICTIONARY_NONFINITE_FIX)
    with safe_open(str(weights), framework="pt") as handle:
        unknown = sorted(set(handle.keys()) - set(required))
    if unknown:
        raise ValueError(f"{weights} holds tensor(s) {unknown} that {source} does not account for.")
    hook_in, hook_out, layer = hooks_for(path.name, transcode)
    run = _run_config(path)
    cfg = DictionaryConfig(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_in,
        kind=("skip_transcoder" if skip else "transcoder") if transcode else "sae",
        activation="topk",
        k=int(data["k"]),
        hook_in=hook_in,
        hook_out=hook_out,
        layer=layer,
        model_name=str(run.get("model") or ""),
        apply_b_dec_to_input=not transcode,
        dataset=str(run.get("dataset") or ""),
        dtype=str(tensors["encoder.weight"].dtype).removeprefix("torch."),
        extra={"sparsify_hookpoint": path.name, "sparsify_cfg": data},
    )
    dictionary = Dictionary.from_config(cfg, device=device)
    with torch.no_grad():
        dictionary.W_enc.copy_(tensors["encoder.weight"].T)
        dictionary.b_enc.copy_(tensors["encoder.bias"])
        dictionary.W_dec.copy_(tensors["W_dec"])
        dictionary.b_dec.copy_(tensors["b_dec"])
        if skip:
            dictionary.W_skip.copy_(tensors["W_skip"].T)
    return [dictionary]


def save(dictionaries: list[Dictionary], path: Path) -> None:
    raise ValueError(
        "sparsify is a read-only format in featcircuits (its files are written by sparsify's own trainer); "
        f"nothing was written to {path}. Save with --to native, saelens or circuit-tracer instead."
    )

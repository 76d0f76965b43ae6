"""Does a set of dictionaries belong to a model? Width and hook names, checked before anything runs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from ..dictionaries.base import Dictionary
from ..dictionaries.cross_layer import CrossLayerTranscoder, check_cross_layer_set

__all__ = ["check_dictionaries_match_model", "hook_width", "same_model_name"]


def _canonical_model_name(name: str) -> str:
    """``name`` as TransformerLens' official name when it is an alias (``gpt2-small`` -> ``gpt2``), reduced to
    its last path part (``google/gemma-2-2b`` and a local ``.../gemma-2-2b`` directory agree), lower-cased."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        name = get_official_model_name(name)
    except (ValueError, ImportError):
        pass
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def same_model_name(a: str, b: str) -> bool:
    """Whether two model names (Hub ids, TransformerLens aliases, local directories) name one model."""
    return _canonical_model_name(a) == _canonical_model_name(b)


def hook_width(model: Any, hook_name: str) -> int:
    """Width of the activation at ``hook_name`` in a HookedTransformer (last dimension)."""
    cfg = model.cfg
    name = hook_name.rsplit(".", 1)[-1]
    if ".mlp." in hook_name and name in ("hook_pre", "hook_post", "hook_pre_linear"):
        return cfg.d_mlp
    if ".attn." in hook_name and name in ("hook_z", "hook_q"):
        return cfg.n_heads * cfg.d_head  # dictionaries read heads flattened
    if ".attn." in hook_name and name in ("hook_k", "hook_v"):
        return (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    return cfg.d_model


def check_dictionaries_match_model(model: Any, dictionaries: Iterable[Dictionary]) -> None:
    """Raise ``ValueError`` naming the dictionaries' model and the given one when they do not fit.

    Checks that every ``hook_in``/``hook_out`` is a hook point of ``model`` and that ``d_in``/``d_out``
    equal the widths of the activations there. Widths that fit but a recorded ``cfg.model_name`` naming
    another model give a ``UserWarning`` naming both: the dictionary runs, but its features were learned
    on another model's activations (a random-init twin, another checkpoint of the same size).

    A cross-layer transcoder must span the model's layers, each of its per-layer hooks is checked, and no other
    dictionary may write an MLP output it reconstructs.
    """
    dictionaries = list(dictionaries)
    check_cross_layer_set(dictionaries, int(model.cfg.n_layers))
    model_name = getattr(model.cfg, "model_name", "") or "the given model"
    hooks = model.hook_dict
    others: dict[str, list[str]] = {}
    for dictionary in dictionaries:
        cfg = dictionary.cfg
        trained_on = cfg.model_name or "an unnamed model"
        what = f"Dictionary {cfg.hook_in!r} (trained on {trained_on})"
        fix = f"Load the dictionaries made for {model_name}, or the model these were trained on ({trained_on})."
        placed = [("reads", cfg.hook_in, cfg.d_in), ("writes", cfg.hook_out, cfg.d_out)]
        if isinstance(dictionary, CrossLayerTranscoder):
            placed = [(role, hook, width) for hook_in, hook_out in zip(dictionary.hooks_in, dictionary.hooks_out, strict=True)
                      for role, hook, width in (("reads", hook_in, cfg.d_in), ("writes", hook_out, cfg.d_out))]
        for role, hook, width in placed:
            if not hook:
                continue
            if hook not in hooks:
                raise ValueError(
                    f"{what} {role} hook {hook!r}, which {model_name} (n_layers={model.cfg.n_layers}) does not have. {fix}"
                )
            expected = hook_width(model, hook)
            if width != expected:
                raise ValueError(
                    f"{what} {role} width {width} at {hook!r}, but {model_name} has width {expected} there "
                    f"(d_model={model.cfg.d_model}): these dictionaries are for a different model. {fix}"
                )
        if cfg.model_name and getattr(model.cfg, "model_name", "") and not same_model_name(cfg.model_name, model_name):
            others.setdefault(cfg.model_name, []).append(cfg.hook_in)
    for trained_on, hooks_in in others.items():
        warnings.warn(
            f"{len(hooks_in)} dictionar{'y' if len(hooks_in) == 1 else 'ies'} ({', '.join(map(repr, hooks_in[:3]))}"
            f"{' ...' if len(hooks_in) > 3 else ''}) record model {trained_on!r} but are used with {model_name!r}. "
            "The widths match, so they run, but their features were learned on another model's activations and "
            f"may mean nothing here. Load the dictionaries made for {model_name}, or the model {trained_on}.",
            UserWarning, stacklevel=2,
        )

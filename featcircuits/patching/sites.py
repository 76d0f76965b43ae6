"""Where a dictionary is spliced in: its :class:`Site`, after checking it fits the model."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from ..dictionaries import Dictionary
from ..dictionaries.cross_layer_slice import CrossLayerSlice
from ..models import check_hook_name
from ..nodes import hook_order_key, site_name
from .records import Site

__all__ = ["make_site", "hook_width"]


def make_site(model: HookedTransformer, dictionary: Dictionary) -> Site:
    """The site of one dictionary in ``model``, its hooks, widths and weights checked; the dictionary (a CLT's,
    for a slice) is moved to the model's device."""
    cfg = dictionary.cfg
    name = site_name(cfg.hook_out)
    for hook in (cfg.hook_in, cfg.hook_out):
        check_hook_name(model, hook)
    layer = int(cfg.hook_out.split(".")[1])
    if layer >= model.cfg.n_layers:
        raise ValueError(f"Dictionary writes {cfg.hook_out!r} but the model has {model.cfg.n_layers} layers.")
    if cfg.kind == "sae" and cfg.hook_in != cfg.hook_out:
        raise ValueError(f"An SAE reads and writes one hook; got hook_in={cfg.hook_in!r}, hook_out={cfg.hook_out!r}.")
    if cfg.kind != "sae" and hook_order_key(cfg.hook_in, model.cfg.n_layers) >= hook_order_key(
        cfg.hook_out, model.cfg.n_layers
    ):
        raise ValueError(f"Transcoder hook_in {cfg.hook_in!r} must come before its hook_out {cfg.hook_out!r}.")
    d_in_model = hook_width(model, cfg.hook_in)
    dictionary.check_input_width(d_in_model, f"hook {cfg.hook_in!r} of {model.cfg.model_name}")
    if cfg.d_out != model.cfg.d_model:
        raise ValueError(
            f"Dictionary for {cfg.hook_out!r} writes width d_out={cfg.d_out} but the model's d_model is "
            f"{model.cfg.d_model}: it was trained for another model. Load the dictionaries that match."
        )
    owner = dictionary.source if isinstance(dictionary, CrossLayerSlice) else dictionary
    bad = [n for n, t in owner.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"Dictionary for {cfg.hook_out!r} has non-finite values in {bad}: it diverged in training "
                         "or was damaged. Retrain it (a lower learning rate) or load an intact copy.")
    owner.to(model.cfg.device)
    return Site(name, cfg.hook_in, cfg.hook_out, layer, dictionary)


def hook_width(model: HookedTransformer, hook: str) -> int:
    """Width of the activation at ``hook`` (a zero-token forward for hooks whose width is not ``d_model``)."""
    if hook.endswith(("hook_normalized", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                      "hook_attn_out", "hook_mlp_out", "hook_mlp_in")):
        return model.cfg.d_model
    with torch.no_grad():
        cache: dict[str, int] = {}
        model.run_with_hooks(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device),
            fwd_hooks=[(hook, lambda x, hook: cache.setdefault("w", x.shape[-1]))],
            return_type=None,
        )
    return cache["w"]

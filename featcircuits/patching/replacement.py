"""ReplacementModel: a HookedTransformer with dictionaries spliced in and explicit error terms.

Each dictionary becomes a *site* (named by :func:`featcircuits.nodes.site_name`): a transcoder
reads ``hook_in`` (usually ``blocks.L.ln2.hook_normalized``) and replaces ``blocks.L.hook_mlp_out``; an
SAE replaces the activation at its own hook (attention output or residual stream). At every site

    output = decode(feature_acts, x_in) + error,      error = original_output - decode(encode(x_in), x_in)

so with unpatched features the replaced model reproduces the original output. Every MLP without a
transcoder is a *bare* site: no features, its whole output is the error term.

A cross-layer transcoder (CLT) becomes one site per MLP, named as per-layer transcoder sites are: site ``L``'s
features are the CLT's layer-``L`` latents (a :class:`~featcircuits.dictionaries.cross_layer_slice.CrossLayerSlice`)
and they write into MLP output ``L`` and every later one, so ``decode`` at output ``M`` is the sum of what the
features of sites ``0..M`` write there (:meth:`ReplacementModel.sources_into`, :meth:`ReplacementModel.decoder`).

Two ways to run (both batched over a leading batch of patch patterns, tokens shared):

* :meth:`ReplacementModel.run` without ``clean``: the live replacement model. Features are computed
  from each site's input; ``feature_acts`` / ``errors`` patches edit them (ablations, ACDC). The error
  term is recomputed from the live input unless patched.
* :meth:`ReplacementModel.run` with ``clean=`` a :class:`CleanRun`: the *frozen* local replacement model.
  Attention patterns and normalisation scales are the clean run's (as constants, so no gradient flows
  through them, the way circuit-tracer detaches them); feature activations and errors are inputs
  (clean unless patched), not recomputed. The map from (feature activations, errors, embeddings) to
  every site's encoder pre-activations and to the logits is then affine, hence edge weights are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from ..dictionaries import Dictionary
from ..dictionaries.cross_layer import CrossLayerTranscoder, check_cross_layer_set
from ..dictionaries.cross_layer_slice import CrossLayerSlice, cross_layer_slices
from ..models import mlp_out
from ..nodes import hook_order_key, site_name
from .cross_layer_hooks import frozen_cross_layer_hooks, live_cross_layer_hooks
from .edge_hooks import FwdHooks
from .frozen_sites import frozen_feature_acts, input_recorder
from .logits import final_norm, unembed
from .records import CleanRun, Patch, ReplacementOutput, Site, apply_patch
from .sites import make_site

__all__ = ["Site", "CleanRun", "ReplacementOutput", "ReplacementModel", "Patch"]

class ReplacementModel:
    """A HookedTransformer plus dictionaries, each spliced in at its own site with an error term.

    Args:
        model: the transformer (any TransformerLens ``HookedTransformer``; weights unprocessed).
        dictionaries: transcoders (``hook_out = blocks.L.hook_mlp_out``) for any subset of layers and
            SAEs on ``hook_attn_out`` / ``hook_resid_*`` hooks, or one cross-layer transcoder over every layer
            (with SAEs off the MLP outputs). At most one dictionary per ``hook_out``.

    Attributes:
        sites: every site in forward order, bare MLP sites included.
    """

    def __init__(self, model: HookedTransformer, dictionaries: Sequence[Dictionary]) -> None:
        self.model = model
        self.cfg = model.cfg
        dictionaries = list(dictionaries)
        check_cross_layer_set(dictionaries, self.cfg.n_layers)
        self.cross_layer: CrossLayerTranscoder | None = None
        expanded: list[Dictionary] = []
        for dictionary in dictionaries:
            if isinstance(dictionary, CrossLayerTranscoder):
                self.cross_layer = dictionary.to(self.cfg.device)
                expanded += cross_layer_slices(dictionary)
            else:
                expanded.append(dictionary)
        sites: dict[str, Site] = {}
        for dictionary in expanded:
            site = make_site(self.model, dictionary)
            if site.name in sites:
                raise ValueError(
                    f"Two dictionaries write {site.hook_out!r}; give at most one dictionary per site."
                )
            sites[site.name] = site
        for layer in range(self.cfg.n_layers):
            name = site_name(mlp_out(layer))
            if name not in sites:
                sites[name] = Site(name, mlp_out(layer), mlp_out(layer), layer, None)
        self.sites: list[Site] = sorted(sites.values(), key=lambda s: hook_order_key(s.hook_out, self.cfg.n_layers))
        self.site_index = {site.name: index for index, site in enumerate(self.sites)}
        # per site index, the sites whose features write into its output (itself, and a CLT's earlier layers)
        self._sources_into: list[list[int]] = [[] for _ in self.sites]
        for index, site in enumerate(self.sites):
            if isinstance(site.dictionary, CrossLayerSlice):
                for layer, _ in site.dictionary.writes():
                    self._sources_into[self.site_index[site_name(mlp_out(layer))]].append(index)
            elif site.dictionary is not None:
                self._sources_into[index].append(index)

    # ---- helpers -------------------------------------------------------------------------------

    @property
    def dictionaries(self) -> list[Dictionary]:
        """The dictionaries spliced in, each once (a cross-layer transcoder itself, not its per-site slices)."""
        owners = [d.source if isinstance(d, CrossLayerSlice) else d for d in (s.dictionary for s in self.sites) if d is not None]
        return list({id(owner): owner for owner in owners}.values())

    def sources_into(self, index: int) -> list[int]:
        """Indices of the sites whose features write into site ``index``'s output: the site itself for SAEs and
        per-layer transcoders, every CLT site up to it for a CLT's MLP output, none for a bare MLP."""
        return self._sources_into[index]

    def outputs_of(self, index: int) -> list[int]:
        """Indices of the sites whose outputs site ``index``'s features write into (see :meth:`sources_into`)."""
        return [into for into, sources in enumerate(self._sources_into) if index in sources]

    def decoder(self, source: int, into: int) -> torch.Tensor:
        """``[d_sae, d_out]``: what site ``source``'s features write into site ``into``'s output per unit of
        activation, before the dictionary's ``1 / cfg.norm_scale`` (a view of the decoder weights)."""
        d = self.sites[source].dictionary
        if d is None or source not in self._sources_into[into]:
            raise ValueError(f"Site {self.sites[source].name} does not write into {self.sites[into].name}.")
        if isinstance(d, CrossLayerSlice):
            return d.source.decoder(d.layer)[:, self.sites[into].layer - d.layer]
        return d.W_dec

    def cross_layer_output(self, index: int, acts_of: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """What the CLT's features write into MLP site ``index`` ``[..., d_out]`` (bias included), from each
        source site's activations ``acts_of(source) [..., d_sae]``."""
        clt = self.cross_layer
        assert clt is not None
        layer = self.sites[index].layer
        out = clt.b_dec[layer]
        for source in self._sources_into[index]:
            out = out + acts_of(source).to(clt.dtype) @ self.decoder(source, index)
        return out / clt.cfg.norm_scale if clt.cfg.norm_scale != 1.0 else out

    def site(self, name: str) -> Site:
        if name not in self.site_index:
            raise KeyError(f"No site {name!r}; sites are {[s.name for s in self.sites]}.")
        return self.sites[self.site_index[name]]

    def to_tokens(self, prompt: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Token ids ``[pos]`` of a prompt (text gets the model's BOS), checked against vocab and context."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("The prompt is empty; give some text (or token ids) to attribute.")
            tokens = self.model.to_tokens(prompt, truncate=False)[0]
        else:
            tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
            if tokens.numel() == 0:
                raise ValueError("The prompt has no tokens; give at least one token id.")
        bad = (tokens < 0) | (tokens >= self.cfg.d_vocab)
        if bad.any():
            raise ValueError(
                f"Token id(s) {tokens[bad].tolist()[:5]} are outside the vocabulary [0, {self.cfg.d_vocab})."
            )
        if tokens.numel() > self.cfg.n_ctx:
            raise ValueError(
                f"The prompt has {tokens.numel()} tokens but the model's context is {self.cfg.n_ctx}; shorten it."
            )
        return tokens.to(self.cfg.device)

    def _scale_hooks(self) -> list[str]:
        return [name for name in self.model.hook_dict if name.endswith("hook_scale")]

    def _pattern_hooks(self) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.cfg.n_layers)]

    @staticmethod
    def _feature_part(dictionary: Dictionary, feature_acts: torch.Tensor) -> torch.Tensor:
        """Decoder output without the skip path ``[..., d_out]`` (skip(0) = 0)."""
        zeros = torch.zeros(*feature_acts.shape[:-1], dictionary.cfg.d_in, device=feature_acts.device,
                            dtype=feature_acts.dtype) if dictionary.W_skip is not None else None
        return dictionary.decode(feature_acts, zeros)

    @staticmethod
    def _skip_part(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor | float:
        if dictionary.W_skip is None:
            return 0.0
        return dictionary.skip(x) / dictionary.cfg.norm_scale

    # ---- the clean run -------------------------------------------------------------------------

    @torch.no_grad()
    def clean_run(self, prompt: str | torch.Tensor | Sequence[int]) -> CleanRun:
        """Run the original model once on one prompt and record what the frozen model needs."""
        tokens = self.to_tokens(prompt)
        run = CleanRun(tokens=tokens, logits=torch.empty(0), embeddings=torch.empty(0))

        def keep(store: dict, key: str) -> Callable:
            def hook(value: torch.Tensor, hook) -> None:
                store[key] = value.detach().clone()
            return hook

        raw: dict[str, torch.Tensor] = {}
        hooks: FwdHooks = [(name, keep(run.patterns, name)) for name in self._pattern_hooks()]
        hooks += [(name, keep(run.scales, name)) for name in self._scale_hooks()]
        hooks.append(("blocks.0.hook_resid_pre", keep(raw, "embed")))
        hooks.append((f"blocks.{self.cfg.n_layers - 1}.hook_resid_post", keep(raw, "resid_final")))
        for site in self.sites:
            hooks.append((site.hook_in, keep(raw, "in:" + site.hook_in)))
            hooks.append((site.hook_out, keep(raw, "out:" + site.hook_out)))
        logits = self.model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        run.logits = logits[0]
        run.embeddings = raw["embed"][0]
        resid = raw["resid_final"][0]
        run.final = final_norm(self.model, resid)
        for site in self.sites:
            original = raw["out:" + site.hook_out][0]
            if site.dictionary is None:
                run.errors[site.name] = original
                continue
            x_in = raw["in:" + site.hook_in][0]
            d = site.dictionary
            run.inputs[site.name] = x_in
            run.pre_acts[site.name] = d.pre_acts(x_in)
            run.feature_acts[site.name] = d.encode(x_in)
            if isinstance(d, CrossLayerSlice):  # the CLT's earlier layers' features write here too
                run.recon_features[site.name] = self.cross_layer_output(
                    self.site_index[site.name], lambda i: run.feature_acts[self.sites[i].name])
                run.errors[site.name] = original - run.recon_features[site.name]
                continue
            run.recon_features[site.name] = self._feature_part(d, run.feature_acts[site.name])
            run.errors[site.name] = original - (run.recon_features[site.name] + self._skip_part(d, x_in))
        return run

    # ---- running with patches ------------------------------------------------------------------

    def run(
        self,
        tokens: str | torch.Tensor | Sequence[int],
        *,
        feature_acts: Mapping[str, Patch] | None = None,
        errors: Mapping[str, Patch] | None = None,
        embeddings: Patch | None = None,
        clean: CleanRun | None = None,
        batch_size: int | None = None,
        return_acts: bool = False,
        output_deltas: dict[str, torch.Tensor] | None = None,
        compute_logits: bool = True,
        features_from_inputs: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        past_kv_cache: TransformerLensKeyValueCache | None = None,
    ) -> ReplacementOutput:
        """Run the replacement model, optionally patched, over a batch of patch patterns.

        Args:
            tokens: one prompt (text or ids ``[pos]``); shared by every batch row.
            feature_acts: per site name, new feature activations ``[pos, d_sae]`` / ``[batch, pos, d_sae]``
                or a function mapping the current ones ``[batch, pos, d_sae]`` to new ones.
            errors: per site name, the same for the error term ``[.., pos, d_model]``.
            embeddings: the same for the embeddings (resid_pre of block 0).
            clean: a :class:`CleanRun` of the same tokens: run the frozen (linear) replacement model.
            batch_size: number of patterns; default: the largest leading axis among the patch tensors.
            return_acts: also return every site's ``pre_acts`` and ``feature_acts``.
            output_deltas: (frozen runs) per site name or ``"embed"``, a tensor ``[batch, pos, d_model]``
                added to the site output; build_graph takes gradients with respect to these.
            compute_logits: skip the unembedding when False (``out.final`` is still returned).
            features_from_inputs: (frozen runs) ``(site name, site input [batch, pos, d_in]) -> feature
                activations [batch, pos, d_sae]``: features are recomputed from their frozen-model input
                (e.g. ``dictionary.encode``, or with edited pre-activations) instead of held at the clean
                run's; ``feature_acts`` patches still apply on top.
            past_kv_cache: (live runs) keys and values of the positions before ``tokens``, e.g. a frozen cache
                of a prefix no patch changes; ``tokens`` and every patch then cover the later positions only.
        """
        feature_acts, errors, output_deltas = feature_acts or {}, errors or {}, output_deltas or {}
        for name in (*feature_acts, *errors):
            self.site(name)
        tokens = clean.tokens if clean is not None else self.to_tokens(tokens)
        if batch_size is None:
            tensors = [p for p in (*feature_acts.values(), *errors.values(), embeddings) if torch.is_tensor(p)]
            batch_size = max([p.shape[0] for p in tensors if p.dim() == 3] + [1])
        state: dict[str, torch.Tensor] = {}
        out = ReplacementOutput(logits=torch.empty(0), final=torch.empty(0))
        if clean is None and features_from_inputs is not None:
            raise ValueError("features_from_inputs applies to frozen runs; pass clean=replacement.clean_run(...).")
        if clean is None and output_deltas:
            raise ValueError("output_deltas apply to frozen runs (the linear model build_graph differentiates); "
                             "pass clean=replacement.clean_run(...), or patch the live run with feature_acts/errors.")
        if clean is not None and past_kv_cache is not None:
            raise ValueError("past_kv_cache applies to live runs; a frozen run (clean=...) holds its clean prefix "
                             "already. Drop one of them.")
        if clean is not None:
            hooks = self._frozen_hooks(clean, batch_size, feature_acts, errors, embeddings, output_deltas, out,
                                       return_acts, state, features_from_inputs)
        else:
            hooks = self._live_hooks(clean, batch_size, feature_acts, errors, embeddings, output_deltas, out,
                                     return_acts, state)
        with self.model.hooks(fwd_hooks=hooks):
            batch_tokens = tokens[None].expand(batch_size, -1)
            # with a cache, an explicit mask (every token real): transformer_lens would otherwise derive one
            # from the tokenizer and treat any token equal to its pad id as padding
            mask = None if past_kv_cache is None else torch.ones_like(batch_tokens)
            resid = self.model(batch_tokens, stop_at_layer=self.cfg.n_layers, past_kv_cache=past_kv_cache,
                               attention_mask=mask)
            final = final_norm(self.model, resid)
        out.final = final
        if compute_logits:
            out.logits = unembed(self.model, final)  # the model's own head: soft caps included
        return out

    def _live_hooks(self, clean, batch, feature_patch, error_patch, embed_patch, deltas, out, return_acts, state):
        """Hooks of the live replacement model: features from the live input, error recomputed live."""
        hooks: FwdHooks = []
        if embed_patch is not None:
            hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: apply_patch(x, embed_patch)))
        for site in self.sites:
            name, d = site.name, site.dictionary
            if isinstance(d, CrossLayerSlice):
                continue  # below: a CLT's MLP outputs sum what several sites' features write
            if d is None:
                if name in error_patch:
                    hooks.append((site.hook_out, lambda x, hook, p=error_patch[name]: apply_patch(x, p)))
                continue
            patched = name in feature_patch or name in error_patch
            if not (patched or return_acts):
                continue  # untouched site: the original activation flows on, bit for bit

            def read(x, hook, name=name, d=d):
                state["x:" + name] = x
                pre = d.pre_acts(x)
                state["acts:" + name] = d.activation(pre)
                if return_acts:
                    out.pre_acts[name] = pre
                    out.feature_acts[name] = apply_patch(state["acts:" + name], feature_patch.get(name))
                return x

            def write(value, hook, name=name, d=d, patched=patched):
                x, acts = state.pop("x:" + name), state.pop("acts:" + name)
                if not patched:
                    return value
                skip = self._skip_part(d, x)
                error = apply_patch(value - (self._feature_part(d, acts) + skip), error_patch.get(name))
                new_acts = apply_patch(acts, feature_patch.get(name))
                return self._feature_part(d, new_acts) + skip + error

            hooks.append((site.hook_in, read))
            hooks.append((site.hook_out, write))
        return hooks + live_cross_layer_hooks(self, feature_patch, error_patch, out, return_acts, state)

    def _frozen_hooks(self, clean, batch, feature_patch, error_patch, embed_patch, deltas, out, return_acts, state,
                      features_from_inputs=None):
        """Hooks of the frozen replacement model: clean patterns and scales, features and errors as inputs."""
        if clean.logits.shape[0] != clean.n_pos:
            raise ValueError("The CleanRun is incomplete; build it with ReplacementModel.clean_run.")

        def constant(value: torch.Tensor) -> Callable:
            # most frozen values are [1, ...]; a q/k norm's scale is [pos * heads, 1] (transformer_lens
            # normalises rows flattened batch-major), so its batch is the rows repeated
            if value.shape[0] == 1:
                return lambda x, hook: value.expand(batch, *value.shape[1:])
            repeated = value.repeat(batch, *([1] * (value.dim() - 1)))
            return lambda x, hook: repeated

        hooks: FwdHooks = [(n, constant(v)) for n, v in clean.patterns.items()]
        hooks += [(n, constant(v)) for n, v in clean.scales.items()]

        def embed(x, hook):
            x = apply_patch(clean.embeddings.expand(batch, -1, -1), embed_patch)
            return x + deltas["embed"] if "embed" in deltas else x

        hooks.append(("blocks.0.hook_resid_pre", embed))
        for site in self.sites:
            name, d = site.name, site.dictionary
            if isinstance(d, CrossLayerSlice):
                continue  # below

            def error_of(name=name):
                return apply_patch(clean.errors[name].expand(batch, -1, -1), error_patch.get(name))

            if d is None:
                def write_bare(value, hook, name=name, error_of=error_of):
                    error = error_of()
                    return error + deltas[name] if name in deltas else error

                hooks.append((site.hook_out, write_bare))
                continue

            def write(value, hook, name=name, d=d, error_of=error_of):
                acts = frozen_feature_acts(clean, batch, name, out, feature_patch, features_from_inputs)
                if acts is not None:
                    recon = self._feature_part(d, acts)
                else:
                    acts, recon = clean.feature_acts[name], clean.recon_features[name].expand(batch, -1, -1)
                if return_acts:
                    out.feature_acts[name] = acts.expand(batch, -1, -1)
                result = recon + self._skip_part(d, out.inputs[name]) + error_of()
                return result + deltas[name] if name in deltas else result

            hooks.append((site.hook_in, input_recorder(out, name, d, return_acts)))
            hooks.append((site.hook_out, write))
        return hooks + frozen_cross_layer_hooks(self, clean, batch, feature_patch, error_patch, deltas, out,
                                                return_acts, state, features_from_inputs)

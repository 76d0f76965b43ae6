"""The transpose of the frozen replacement model, written out: gradients without an autograd graph.

In the frozen replacement model (clean attention patterns and normalisation scales, every MLP output
replaced by its site's features plus error) the only paths from one site to another are the residual
stream, the frozen normalisations and the attention value-output maps. The gradient of a batch of
seeds (encoder directions at site inputs, read-out vectors at the unembedding input) with respect to
every site output is therefore a short sequence of matmuls per layer, walked from the top down:

    resid_post -> (mlp_out: site, cut) -> resid_mid -> (ln2 seeds) -> attn_out -> attention^T -> ln1^T -> resid_pre

Against running autograd through the whole HookedTransformer this skips the batched forward pass
(queries, keys, softmax and MLPs computed for every batch row only to be discarded), the bookkeeping
of the autograd graph, and all work above the highest seeded layer and after the last seeded
position (causal attention: positions after the last seed receive no gradient).

Supported: pre-norm blocks with LayerNorm / RMSNorm (with or without weights) or none, multi-head or
grouped-query attention, sites on ``hook_mlp_out`` / ``hook_attn_out`` / ``hook_resid_*`` whose
inputs are read at ``hook_resid_*``, ``ln1/ln2.hook_normalized``, ``hook_mlp_in`` or ``hook_attn_out``.
:func:`unsupported_reason` names what is not (parallel attention and MLP, post-norm, ...), and
``build_graph`` then takes gradients with autograd instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

# from their defining modules: transformer_lens.components re-exports them without declaring them public
from transformer_lens.components.layer_norm import LayerNorm
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.rms_norm import RMSNorm
from transformer_lens.components.rms_norm_pre import RMSNormPre

from .replacement import CleanRun, ReplacementModel

__all__ = ["LinearBackward", "SparseSeed", "unsupported_reason"]

# receives (site index, gradient [batch, n_pos, d_model] at the site's output)
Consumer = Callable[[int, torch.Tensor], None]


class SparseSeed(NamedTuple):
    """A seed that is non-zero at one position per seeded row: ``vectors[i]`` ``[m, d_in]`` goes to batch row
    ``rows[i]`` at position ``pos[i]`` of a ``[batch, n_pos, d_in]`` gradient (a feature's encoder direction
    at its own position), so no dense ``[batch, n_pos, d_in]`` tensor per site is built.

    ``extent`` is ``max(rows) + 1``. Rows are live from their seed down: with a batch's rows ordered by seed
    site, highest first, the walk carries only the prefix of rows seeded so far, and the gradients it hands
    on (and returns) may have fewer than ``batch`` rows: the missing ones are zero."""

    rows: torch.Tensor
    pos: torch.Tensor
    vectors: torch.Tensor
    batch: int
    extent: int


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` for gradients whose leading (row) axes may differ: the shorter one is a zero-padded prefix."""
    if a is None or b is None:
        return b if a is None else a
    if a.shape[0] < b.shape[0]:
        a, b = b, a
    if a.shape[0] == b.shape[0]:
        return a + b
    total = a.clone()
    total[: b.shape[0]] += b
    return total

_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)
_READ_HOOKS = ("hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
               "ln2.hook_normalized", "hook_resid_post")


def unsupported_reason(rm: ReplacementModel) -> str | None:
    """Why :class:`LinearBackward` cannot run this replacement model, or None when it can."""
    cfg = rm.cfg
    for flag in ("parallel_attn_mlp", "attn_only", "use_normalization_before_and_after", "use_split_qkv_input",
                 "use_attn_in"):
        if getattr(cfg, flag, False):
            return f"cfg.{flag} is set"
    for block in rm.model.blocks:
        for name in ("ln1", "ln2"):
            norm = getattr(block, name, None)
            if norm is not None and not isinstance(norm, (*_NORMS, torch.nn.Identity)):
                return f"{name} is a {type(norm).__name__}"
        if type(block.attn).__name__ not in ("Attention", "GroupedQueryAttention"):
            return f"attention is a {type(block.attn).__name__}"
        if block.attn.W_V.dim() != 3 or block.attn.W_O.dim() != 3:
            return "attention weights are not [n_heads, d_model, d_head] / [n_heads, d_head, d_model]"
    post_norm = ("olmo2", "olmo3")
    if any(key in str(cfg.original_architecture).lower() for key in post_norm):
        return f"{cfg.original_architecture} is post-norm"
    for site in rm.sites:
        if site.dictionary is None:
            continue  # a bare MLP: error node only, nothing is read
        parts = site.hook_in.split(".", 2)
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in _READ_HOOKS:
            return f"site {site.name} reads {site.hook_in}"
    return None


def _full(grad: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A gradient with every one of the ``batch`` rows (the rows not yet live are zero)."""
    if grad is None or grad.shape[0] >= batch:
        return grad
    return torch.cat([grad, grad.new_zeros(batch - grad.shape[0], *grad.shape[1:])])


class LinearBackward:
    """Gradients of seeded targets with respect to every site output of one prompt's frozen model.

    Args:
        rm: the replacement model (see :func:`unsupported_reason` for what it may contain).
        clean: its :class:`CleanRun` on the prompt (patterns ``[1, n_heads, pos, pos]``, scales ``[1, pos, 1]``).
        dtype: the gradients' dtype (default: the model's); e.g. float32 for a bf16 model. The attention
            weights are used as transposed views when the dtype matches (no copy), as copies otherwise.
    """

    def __init__(self, rm: ReplacementModel, clean: CleanRun, dtype: torch.dtype | None = None) -> None:
        reason = unsupported_reason(rm)
        if reason is not None:
            raise ValueError(f"LinearBackward cannot run this model: {reason}.")
        self.rm, self.clean = rm, clean
        self.dtype = dtype = dtype or rm.cfg.dtype
        self._n_pos = clean.n_pos  # positions of the current grads() call
        self.n_layers = rm.cfg.n_layers
        self.layers = []
        for layer, block in enumerate(rm.model.blocks):
            attn = block.attn
            n_heads, d_model, d_head = attn.W_V.shape
            self.layers.append({
                # [d_model, n_heads * d_head] and [n_heads * d_head, d_model], transposed for the backward
                # transposed views (matmul reads them as they are); copies only to change the dtype
                "W_O_T": attn.W_O.detach().reshape(n_heads * d_head, d_model).T.to(dtype),
                "W_V_T": attn.W_V.detach().permute(1, 0, 2).reshape(d_model, n_heads * d_head).T.to(dtype),
                # pattern[h, q, k] transposed to [h, k, q]: the value gradient sums over queries
                "pattern_T": clean.patterns[f"blocks.{layer}.attn.hook_pattern"][0].transpose(1, 2).to(
                    dtype, copy=True).contiguous(),
                "n_heads": n_heads, "d_head": d_head,
                "ln1": self._norm(block.ln1, f"blocks.{layer}.ln1.hook_scale"),
                "ln2": self._norm(block.ln2, f"blocks.{layer}.ln2.hook_scale"),
            })
        self.ln_final = self._norm(getattr(rm.model, "ln_final", None), "ln_final.hook_scale")
        # per hook, the forward order of site reads (hook_in) and writes (hook_out) applied there: the
        # replacement model registers each site's read, then its write, site by site (so an SAE reads its
        # hook before replacing it)
        self.events: dict[str, list[tuple[str, int]]] = {}
        for index, site in enumerate(rm.sites):
            self.events.setdefault(site.hook_in, []).append(("read", index))
            self.events.setdefault(site.hook_out, []).append(("write", index))
        self.skip_T = {
            index: site.dictionary.W_skip.detach().T.to(dtype, copy=True) for index, site in enumerate(rm.sites)
            if site.dictionary is not None and site.dictionary.W_skip is not None
        }

    def _norm(self, module, scale_hook: str) -> dict | None:
        """A frozen normalisation: ``centered``, ``1 / scale [pos, 1]`` and the weight (None: no weight)."""
        if module is None or isinstance(module, torch.nn.Identity):
            return None
        return {
            "centered": isinstance(module, (LayerNorm, LayerNormPre)),
            "inv_scale": 1.0 / self.clean.scales[scale_hook][0].to(self.dtype),
            "w": module.w.detach().to(self.dtype, copy=True) if isinstance(module, (LayerNorm, RMSNorm)) else None,
        }

    @staticmethod
    def _through_norm(grad: torch.Tensor, norm: dict | None, n_pos: int, weighted: bool) -> torch.Tensor:
        """Gradient at a frozen norm's input from that at its output (``weighted``) or its
        ``hook_normalized`` (not): ``center((g * w) / scale)``."""
        if norm is None:
            return grad
        if weighted and norm["w"] is not None:
            grad = grad * norm["w"]
        grad = grad * norm["inv_scale"][:n_pos]
        return grad - grad.mean(-1, keepdim=True) if norm["centered"] else grad

    def _attention(self, grad: torch.Tensor, layer: dict, n_pos: int) -> torch.Tensor:
        """``[batch, pos, d_model]`` gradient at ``hook_attn_out`` -> at the attention's (ln1) input."""
        batch = grad.shape[0]
        heads, d_head = layer["n_heads"], layer["d_head"]
        # Batch rows go into the matmul's columns: one [k, q] @ [q, batch * d_head] product per head
        # instead of batch * heads tiny ones.
        grad_z = (grad @ layer["W_O_T"]).view(batch, n_pos, heads, d_head).permute(2, 1, 0, 3)  # [h, q, b, dh]
        grad_v = layer["pattern_T"][:, :n_pos, :n_pos] @ grad_z.reshape(heads, n_pos, batch * d_head)
        grad_v = grad_v.view(heads, n_pos, batch, d_head).permute(2, 1, 0, 3)  # [b, k, h, dh]
        return grad_v.reshape(batch, n_pos, heads * d_head) @ layer["W_V_T"]

    def _hook(self, hook: str, grad: torch.Tensor | None, seeds: Mapping[int, torch.Tensor | SparseSeed],
              out: dict[int, torch.Tensor | None] | Consumer, skip: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Walk one hook's site events backwards: a write records (or hands on) and cuts, a read adds its seed."""
        for kind, index in reversed(self.events.get(hook, ())):
            if kind == "write":
                if isinstance(out, dict):
                    out[index] = grad
                elif grad is not None:
                    out(index, grad)
                if grad is not None and index in self.skip_T:
                    skip[index] = grad @ self.skip_T[index]  # the skip path reads the site's input
                grad = None
            else:
                for extra in (seeds.get(index), skip.pop(index, None)):
                    if isinstance(extra, SparseSeed):
                        live = 0 if grad is None else grad.shape[0]
                        width = extra.vectors.shape[-1]
                        if grad is None or live < extra.extent:  # rows seeded here join the walk
                            grown = extra.vectors.new_zeros(max(live, extra.extent), self._n_pos, width)
                            if grad is not None:
                                grown[:live] = grad
                            grad = grown
                        else:  # a copy: the consumer or the caller may still hold the tensor
                            grad = grad.clone()
                        grad.index_put_((extra.rows, extra.pos), extra.vectors, accumulate=True)
                    elif extra is not None:
                        grad = _plus(grad, extra)
        return grad

    def grads(self, seeds: Mapping[int, torch.Tensor | SparseSeed], final_seed: torch.Tensor | None,
              n_pos: int, consume: Consumer | None = None) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """Gradients of the seeded targets at every site output and at the embeddings.

        Args:
            seeds: per site index, ``[batch, n_pos, d_in]`` (or a :class:`SparseSeed`): the gradient placed
                at the site's input.
            final_seed: ``[batch, n_pos, d_model]`` at the unembedding input (after ``ln_final``), or None.
            n_pos: positions to keep: every seed lies before ``n_pos`` (later ones get no gradient).
            consume: called as ``consume(site index, grad)`` the moment a site's gradient is known (top
                site first), instead of returning them all: only a few ``[batch, n_pos, d_model]`` tensors
                are then alive at once, not one per site.

        Returns:
            per site ``[batch, n_pos, d_model]`` (None where no seed reaches it, and every entry None with
            ``consume``) and the same at the embeddings. With ``consume``, the gradients handed on and the
            embeddings' may hold only the first rows (see :class:`SparseSeed`); the others are zero.
        """
        out: dict[int, torch.Tensor | None] | Consumer = {} if consume is None else consume
        self._n_pos = n_pos
        skip: dict[int, torch.Tensor] = {}
        grad = None
        if final_seed is not None:
            grad = self._through_norm(final_seed, self.ln_final, n_pos, weighted=True)
        for layer in reversed(range(self.n_layers)):
            params = self.layers[layer]
            prefix = f"blocks.{layer}."
            grad = self._hook(prefix + "hook_resid_post", grad, seeds, out, skip)
            self._hook(prefix + "hook_mlp_out", grad, seeds, out, skip)  # the MLP itself is always cut
            normalized = self._hook(prefix + "ln2.hook_normalized", None, seeds, out, skip)
            if normalized is not None:
                through = self._through_norm(normalized, params["ln2"], n_pos, weighted=False)
                grad = _plus(grad, through)
            grad = self._hook(prefix + "hook_mlp_in", grad, seeds, out, skip)
            grad = self._hook(prefix + "hook_resid_mid", grad, seeds, out, skip)
            attn_grad = self._hook(prefix + "hook_attn_out", grad, seeds, out, skip)
            normalized = None
            if attn_grad is not None:
                attn_in = self._attention(attn_grad, params, n_pos)
                norm = params["ln1"]
                normalized = attn_in * norm["w"] if norm is not None and norm["w"] is not None else attn_in
                if norm is None:  # no normalisation: the attention input is the residual stream
                    grad = _plus(grad, normalized)
                    normalized = None
            normalized = self._hook(prefix + "ln1.hook_normalized", normalized, seeds, out, skip)
            if normalized is not None:
                through = self._through_norm(normalized, params["ln1"], n_pos, weighted=False)
                grad = _plus(grad, through)
            grad = self._hook(prefix + "hook_resid_pre", grad, seeds, out, skip)
        if not isinstance(out, dict):
            return [None] * len(self.rm.sites), grad
        batch = max([seed.batch if isinstance(seed, SparseSeed) else seed.shape[0] for seed in seeds.values()]
                    + ([final_seed.shape[0]] if final_seed is not None else []), default=0)
        site_grads = [_full(out.get(index), batch) for index in range(len(self.rm.sites))]
        return site_grads, _full(grad, batch)

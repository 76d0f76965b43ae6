"""Direct effects in one prompt's frozen local replacement model: the linear graph's edge weights.

With the clean run's attention patterns and normalisation scales, every site's feature activations and
error term feed every later site's encoder pre-activations, and the unembedding input, linearly. The
gradient of a batch of read-outs (a feature's pre-activation at its position, or one dimension of the final
residual stream at the last position) with respect to every site's feature activations and error term, with
all other features held, is therefore a set of exact edge weights. Two engines give it: the frozen model's
transpose written out (:class:`.LinearBackward`, the engine ``build_graph`` uses) and autograd through the
frozen HookedTransformer run (any architecture the replacement model runs).
"""

from __future__ import annotations

import torch

from .linear_backward import LinearBackward, unsupported_reason
from .records import CleanRun
from .replacement import ReplacementModel

__all__ = ["DirectEffects"]


class DirectEffects:
    """Gradients of read-outs of one prompt's frozen model with respect to feature activations and errors.

    Args:
        rm: the replacement model.
        clean: its clean run of the prompt.
        engine: ``"linear"``, ``"autograd"`` or ``"auto"`` (linear where :func:`unsupported_reason` allows).
    """

    def __init__(self, rm: ReplacementModel, clean: CleanRun, engine: str = "auto") -> None:
        if engine not in ("auto", "linear", "autograd"):
            raise ValueError(f"engine={engine!r}; choose 'auto', 'linear' or 'autograd'.")
        reason = unsupported_reason(rm)
        if engine == "linear" and reason is not None:
            raise ValueError(f"The linear engine cannot run this model ({reason}); use engine='autograd'.")
        self.rm, self.clean = rm, clean
        self.engine = "linear" if engine == "linear" or (engine == "auto" and reason is None) else "autograd"
        self._linear = LinearBackward(rm, clean) if self.engine == "linear" else None

    def grads(self, receivers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
              final_dims: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per site name, ``[rows, pos, d_sae]`` gradients with respect to its feature activations, and per
        ``"error:" + site name`` ``[rows, pos, d_model]`` with respect to its error term.

        Args:
            receivers: ``(site index, pos, feature)``, each ``[rows]``: one row per feature pre-activation.
                None: one row per dimension in ``final_dims`` of the unembedding input at the last position.
        """
        if self._linear is not None:
            return self._linear_grads(self._linear, receivers, final_dims)
        return self._autograd_grads(receivers, final_dims)

    def _linear_grads(self, linear: LinearBackward, receivers, final_dims) -> dict[str, torch.Tensor]:
        rm, clean = self.rm, self.clean
        n_pos, d_model = clean.n_pos, rm.cfg.d_model
        device, dtype = clean.final.device, clean.final.dtype
        seeds: dict[int, torch.Tensor] = {}
        final_seed = None
        if receivers is None:
            assert final_dims is not None
            final_seed = torch.zeros(len(final_dims), n_pos, d_model, device=device, dtype=dtype)
            final_seed[torch.arange(len(final_dims)), -1, final_dims.to(device)] = 1.0
            rows = len(final_dims)
        else:
            site, pos, feature = (x.to(device) for x in receivers)
            rows = len(site)
            row = torch.arange(rows, device=device)
            for site_index in site.unique().tolist():
                d = rm.sites[site_index].dictionary
                here = site == site_index
                seed = torch.zeros(rows, n_pos, d.cfg.d_in, device=device, dtype=dtype)
                # d pre_acts / d input: the encoder column, scaled as the dictionary scales its input
                seed[row[here], pos[here]] = (d.cfg.norm_scale * d.W_enc.detach()[:, feature[here]].T).to(dtype)
                seeds[site_index] = seed
        site_grads, _ = linear.grads(seeds, final_seed, n_pos)
        out: dict[str, torch.Tensor] = {}
        for site, grad in zip(rm.sites, site_grads, strict=True):
            if grad is not None:
                out["error:" + site.name] = grad
        for index, site in enumerate(rm.sites):
            d = site.dictionary
            if d is None:
                continue
            # d output / d feature activation: the decoder rows into every output the features write (one
            # for SAEs and per-layer transcoders; a CLT's layer writes into its MLP output and later ones)
            parts = [grad @ rm.decoder(index, into).detach().T.to(grad.dtype)
                     for into in rm.outputs_of(index) if (grad := site_grads[into]) is not None]
            if parts:
                out[site.name] = sum(parts[1:], parts[0]) / d.cfg.norm_scale
        return out

    def _autograd_grads(self, receivers, final_dims) -> dict[str, torch.Tensor]:
        rm, clean = self.rm, self.clean
        rows = len(final_dims) if receivers is None else len(receivers[0])
        feature_leaves = {name: acts.expand(rows, -1, -1).clone().requires_grad_()
                          for name, acts in clean.feature_acts.items()}
        error_leaves = {name: err.expand(rows, -1, -1).clone().requires_grad_() for name, err in clean.errors.items()}
        with torch.enable_grad():
            out = rm.run(clean.tokens, clean=clean, feature_acts=feature_leaves, errors=error_leaves,
                         batch_size=rows, return_acts=receivers is not None, compute_logits=False)
            if receivers is None:
                objective = out.final[:, -1, final_dims.to(out.final.device)].diagonal().sum()
            else:
                site, pos, feature = (x.to(out.final.device) for x in receivers)
                row = torch.arange(rows, device=out.final.device)
                objective = out.final.new_zeros(())
                for site_index in site.unique().tolist():
                    here = site == site_index
                    pre = out.pre_acts[rm.sites[site_index].name]
                    objective = objective + pre[row[here], pos[here], feature[here]].sum()
            if not objective.requires_grad:
                return {}
            leaves = [*feature_leaves.values(), *error_leaves.values()]
            names = [*feature_leaves, *("error:" + k for k in error_leaves)]
            grads = torch.autograd.grad(objective, leaves, allow_unused=True)
        return {name: grad for name, grad in zip(names, grads, strict=True) if grad is not None}

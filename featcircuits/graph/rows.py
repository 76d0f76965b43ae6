"""Rows of the attribution graph's adjacency: the gradients of seeded targets contracted with every source."""

from __future__ import annotations

import torch

from ..patching.linear_backward import LinearBackward
from ..patching.records import CleanRun
from ..patching.replacement import ReplacementModel

__all__ = ["RowComputer"]


class RowComputer:
    """Seeds up to ``batch`` targets per call and returns their rows of the adjacency.

    Two engines give the same gradients: ``"linear"`` walks the transpose of the frozen model layer by
    layer (:class:`LinearBackward`; no forward pass, work only below the highest seed and up to the
    last seeded position); ``"autograd"`` runs one batched frozen forward through the HookedTransformer
    and one ``autograd.grad`` per call (any architecture the replacement model supports).
    """

    def __init__(self, rm: ReplacementModel, clean: CleanRun, batch: int, feature_site: torch.Tensor,
                 feature_pos: torch.Tensor, feature_id: torch.Tensor, feature_act: torch.Tensor,
                 engine: str) -> None:
        self.rm, self.clean, self.batch = rm, clean, batch
        self.feature_site, self.feature_pos, self.feature_id = feature_site, feature_pos, feature_id
        n_pos, device, dtype = clean.n_pos, rm.cfg.device, rm.cfg.dtype
        self.names = [site.name for site in rm.sites] + ["embed"]
        self.linear = LinearBackward(rm, clean) if engine == "linear" else None
        if self.linear is None:
            self.deltas = {
                name: torch.zeros(batch, n_pos, rm.cfg.d_model, device=device, dtype=dtype, requires_grad=True)
                for name in self.names
            }
            with torch.enable_grad():
                self.out = rm.run(clean.tokens, clean=clean, batch_size=batch, output_deltas=self.deltas,
                                  compute_logits=False)
        # what each source writes: decoder rows scaled by activations, error vectors, embeddings
        self.n_active = int(feature_site.numel())
        self.decoder_vectors = torch.empty(self.n_active, rm.cfg.d_model, device=device, dtype=dtype)
        for index, site in enumerate(rm.sites):
            members = (feature_site == index).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            start, end = int(members[0]), int(members[-1]) + 1
            d = site.dictionary
            assert d is not None  # active features lie only at sites with a dictionary
            self.decoder_vectors[start:end] = (
                feature_act[start:end, None] * d.W_dec.detach()[feature_id[start:end]] / d.cfg.norm_scale
            )
        # Per site, its decoder vectors laid out [pos, slot, d_model] (zero-padded to the busiest position) so
        # that one batched matmul over positions contracts a site's gradient with all its features at once;
        # ``flat_index`` maps each feature (in column order) to its (pos, slot) in that layout.
        self.site_layouts: dict[int, dict] = {}
        for index in range(len(rm.sites)):
            members = (feature_site == index).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            start, pos = int(members[0]), feature_pos[members]
            per_pos = torch.bincount(pos, minlength=n_pos)
            first = torch.cumsum(per_pos, 0) - per_pos  # features at earlier positions
            slot = torch.arange(pos.numel(), device=device) - first[pos]
            slots = int(per_pos.max())
            padded = torch.zeros(n_pos, slots, rm.cfg.d_model, device=device, dtype=dtype)
            padded[pos, slot] = self.decoder_vectors[members]
            self.site_layouts[index] = {
                "start": start, "slots": slots, "padded_T": padded.transpose(1, 2).contiguous(),
                "flat_index": pos * slots + slot, "before": torch.cat([first, per_pos.sum().reshape(1)]).tolist(),
            }
        self.sources = [clean.errors[site.name] for site in rm.sites] + [clean.embeddings]  # each [pos, d]
        self.n_cols = self.n_active + (len(rm.sites) + 1) * n_pos

    def _grads(self, seeds: dict[int, torch.Tensor], final_seed: torch.Tensor | None, k: int,
               n_pos: int) -> list[torch.Tensor | None]:
        """Per site, then the embeddings: the gradient ``[k, n_pos, d_model]`` of the ``k`` seeded targets."""
        if self.linear is not None:
            site_grads, embed_grad = self.linear.grads(
                {index: seed[:, :n_pos] for index, seed in seeds.items()},
                None if final_seed is None else final_seed[:, :n_pos], n_pos)
            return [*site_grads, embed_grad]
        sites = self.rm.sites
        outputs = [self.out.inputs[sites[index].name] for index in seeds]
        grad_outputs = [self._padded(seed) for seed in seeds.values()]
        if final_seed is not None:
            outputs.append(self.out.final)
            grad_outputs.append(self._padded(final_seed))
        inputs = [self.deltas[name] for name in self.names]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
        return [None if grad is None else grad[:k] for grad in grads]

    def _padded(self, seed: torch.Tensor) -> torch.Tensor:
        """A ``[k, pos, d]`` seed as the ``[batch, pos, d]`` gradient of the batched forward."""
        if seed.shape[0] == self.batch:
            return seed
        return torch.cat([seed, seed.new_zeros(self.batch - seed.shape[0], *seed.shape[1:])])

    def rows(self, seeds: dict[int, torch.Tensor], final_seed: torch.Tensor | None, n_pos: int,
             rows: torch.Tensor) -> None:
        """Write the rows of the ``k`` seeded targets into ``rows`` ``[k, n_cols]`` (zero on entry).

        ``seeds`` per site index ``[k, pos, d_in]`` (the encoder direction at each target's input);
        ``final_seed`` ``[k, pos, d_model]`` at the unembedding input; every seed lies before ``n_pos``.
        """
        k = rows.shape[0]
        n_pos = self.clean.n_pos if self.linear is None else n_pos
        grads = self._grads(seeds, final_seed, k, n_pos)
        for index, grad in enumerate(grads):
            if grad is None:  # none of the seeded targets depends on this site
                continue
            columns = self._site_columns(index)
            rows[:, columns.start:columns.start + n_pos] = torch.einsum(
                "kpd,pd->kp", grad, self.sources[index][:n_pos])
            layout = self.site_layouts.get(index)
            if layout is None:
                continue
            n_features = layout["before"][n_pos]  # features after n_pos receive nothing from the seeds
            by_position = torch.bmm(grad.transpose(0, 1), layout["padded_T"][:n_pos])  # [pos, k, slots]
            flat = by_position.transpose(0, 1).reshape(k, n_pos * layout["slots"])
            start = layout["start"]
            torch.index_select(flat, 1, layout["flat_index"][:n_features], out=rows[:, start:start + n_features])

    def _site_columns(self, index: int) -> slice:
        """Columns of the error nodes of site ``index`` (the embeddings for ``index == n_sites``)."""
        n_pos = self.clean.n_pos
        start = self.n_active + index * n_pos
        return slice(start, start + n_pos)

    def feature_seeds(self, features: torch.Tensor) -> tuple[dict[int, torch.Tensor], int]:
        """Encoder directions of ``features`` (indices into the active list) at their sites' inputs,
        per site index ``[k, pos, d_in]``, and the number of positions they span (last position + 1)."""
        seeds: dict[int, torch.Tensor] = {}
        k, n_pos = features.numel(), self.clean.n_pos
        row = torch.arange(k, device=features.device)
        sites = self.feature_site[features]
        for index in sites.unique().tolist():
            d = self.rm.sites[index].dictionary
            member = sites == index
            chosen = features[member]
            seed = torch.zeros(k, n_pos, d.cfg.d_in, device=features.device, dtype=self.rm.cfg.dtype)
            seed[row[member], self.feature_pos[chosen]] = (
                d.cfg.norm_scale * d.W_enc.detach()[:, self.feature_id[chosen]].T).to(seed.dtype)
            seeds[index] = seed
        return seeds, int(self.feature_pos[features].max()) + 1

"""Rows of the attribution graph's adjacency: the gradients of seeded targets contracted with every source."""

from __future__ import annotations

import torch

from ..patching.linear_backward import LinearBackward, SparseSeed
from ..patching.records import CleanRun
from ..patching.replacement import ReplacementModel

__all__ = ["RowComputer", "layout_entries"]


def layout_entries(feature_site: torch.Tensor, feature_pos: torch.Tensor, n_sites: int, n_pos: int,
                   fanout: list[int] | None = None) -> int:
    """Decoder vectors the row computer lays out (the active ones, zero-padded per site to its busiest
    position, once per output the site writes: ``fanout[site]``, 1 by default, ``n - L`` for a CLT's layer
    ``L``): its decoder layout holds this many ``[d_model]`` vectors."""
    if feature_site.numel() == 0:
        return 0
    counts = torch.bincount(feature_site * n_pos + feature_pos, minlength=n_sites * n_pos).reshape(n_sites, n_pos)
    busiest = counts.amax(dim=1)
    if fanout is not None:
        busiest = busiest * torch.tensor(fanout, device=busiest.device)
    return int(busiest.sum()) * n_pos


class RowComputer:
    """Seeds up to ``batch`` targets per call and returns their rows of the adjacency.

    Two engines give the same gradients: ``"linear"`` walks the transpose of the frozen model layer by
    layer (:class:`LinearBackward`; no forward pass, work only below the highest seed and up to the
    last seeded position, each site's gradient contracted as soon as it is known); ``"autograd"`` runs
    one batched frozen forward through the HookedTransformer and one ``autograd.grad`` per call (any
    architecture the replacement model supports).

    The linear engine computes in float32 whatever the model's dtype (a bf16 model gets fp32 edges); the
    autograd engine in the model's dtype. With ``offload``, the decoder layout (every active feature's
    decoder vector times its activation, the largest per-prompt tensor) stays on the CPU and each site's
    slice is moved to the model's device when that site's gradient is contracted; encoder columns are
    gathered from wherever the dictionaries' weights are (they may be offloaded too).
    """

    def __init__(self, rm: ReplacementModel, clean: CleanRun, batch: int, feature_site: torch.Tensor,
                 feature_pos: torch.Tensor, feature_id: torch.Tensor, feature_act: torch.Tensor,
                 engine: str, offload: bool = False) -> None:
        self.rm, self.clean, self.batch = rm, clean, batch
        self.feature_site, self.feature_pos, self.feature_id = feature_site, feature_pos, feature_id
        n_pos, device = clean.n_pos, clean.tokens.device
        self.device = device
        self.dtype = dtype = torch.float32 if engine == "linear" else rm.cfg.dtype
        self.names = [site.name for site in rm.sites] + ["embed"]
        self.linear = LinearBackward(rm, clean, dtype=dtype) if engine == "linear" else None
        if self.linear is None:
            self.deltas = {
                name: torch.zeros(batch, n_pos, rm.cfg.d_model, device=device, dtype=dtype, requires_grad=True)
                for name in self.names
            }
            with torch.enable_grad():
                self.out = rm.run(clean.tokens, clean=clean, batch_size=batch, output_deltas=self.deltas,
                                  compute_logits=False)
        self.n_active = int(feature_site.numel())
        store = torch.device("cpu") if offload else device
        pin = offload and device.type == "cuda"
        # Per site, what its active features write into each output (decoder rows times activations; a
        # CLT's features write into their own MLP output and every later one) laid out [pos, d_model, slot]
        # (zero-padded to the busiest position) so that one batched matmul over positions contracts an output's
        # gradient with all the site's features at once; ``flat_index`` maps each feature (in column order)
        # to its (pos, slot). Built straight into the layout: no second [n_active, d_model] copy. Keyed by
        # the output site: the layouts whose gradient arrives there.
        self.site_layouts: dict[int, list[dict]] = {}
        for index, site in enumerate(rm.sites):
            members = (feature_site == index).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            d = site.dictionary
            assert d is not None  # active features lie only at sites with a dictionary
            start, end, pos = int(members[0]), int(members[-1]) + 1, feature_pos[members]
            per_pos = torch.bincount(pos, minlength=n_pos)
            first = torch.cumsum(per_pos, 0) - per_pos  # features at earlier positions
            slot = torch.arange(pos.numel(), device=device) - first[pos]
            slots = int(per_pos.max())
            outputs = rm.outputs_of(index)
            scale = feature_act[start:end, None].to(store, dtype) / d.cfg.norm_scale
            for into in outputs:
                padded = torch.zeros(n_pos, rm.cfg.d_model, slots, device=store, dtype=dtype, pin_memory=pin)
                decoder = rm.decoder(index, into).detach()
                vectors = decoder[feature_id[start:end].to(decoder.device)].to(store, dtype) * scale
                padded[pos.to(store), :, slot.to(store)] = vectors
                self.site_layouts.setdefault(into, []).append({
                    "start": start, "slots": slots, "padded_T": padded, "accumulate": len(outputs) > 1,
                    "flat_index": pos * slots + slot, "before": torch.cat([first, per_pos.sum().reshape(1)]).tolist(),
                })
                del vectors
        self.sources = [clean.errors[site.name].to(dtype) for site in rm.sites] + [clean.embeddings.to(dtype)]
        self.n_cols = self.n_active + (len(rm.sites) + 1) * n_pos

    def layout_bytes(self) -> int:
        """Bytes of the decoder layout (on the CPU with ``offload``)."""
        return sum(layout["padded_T"].numel() * layout["padded_T"].element_size()
                   for layouts in self.site_layouts.values() for layout in layouts)

    def _autograd_grads(self, seeds: dict[int, torch.Tensor | SparseSeed], final_seed: torch.Tensor | None,
                        k: int) -> list[torch.Tensor | None]:
        """Per site, then the embeddings: the gradient ``[k, n_pos, d_model]`` of the ``k`` seeded targets."""
        sites = self.rm.sites
        outputs = [self.out.inputs[sites[index].name] for index in seeds]
        grad_outputs = [self._padded(self._dense(seed)) for seed in seeds.values()]
        if final_seed is not None:
            outputs.append(self.out.final)
            grad_outputs.append(self._padded(final_seed))
        inputs = [self.deltas[name] for name in self.names]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
        return [None if grad is None else grad[:k] for grad in grads]

    def _dense(self, seed: torch.Tensor | SparseSeed) -> torch.Tensor:
        if not isinstance(seed, SparseSeed):
            return seed
        dense = seed.vectors.new_zeros(seed.batch, self.clean.n_pos, seed.vectors.shape[-1])
        dense[seed.rows, seed.pos] = seed.vectors
        return dense

    def _padded(self, seed: torch.Tensor) -> torch.Tensor:
        """A ``[k, pos, d]`` seed as the ``[batch, pos, d]`` gradient of the batched forward."""
        if seed.shape[0] == self.batch:
            return seed
        return torch.cat([seed, seed.new_zeros(self.batch - seed.shape[0], *seed.shape[1:])])

    def rows(self, seeds: dict[int, torch.Tensor | SparseSeed], final_seed: torch.Tensor | None, n_pos: int,
             rows: torch.Tensor) -> None:
        """Write the rows of the ``k`` seeded targets into ``rows`` ``[k, n_cols]`` (zero on entry).

        ``seeds`` per site index (:meth:`feature_seeds`: the encoder direction at each target's input);
        ``final_seed`` ``[k, pos, d_model]`` at the unembedding input; every seed lies before ``n_pos``.
        """
        k = rows.shape[0]
        if self.linear is not None:
            def consume(index: int, grad: torch.Tensor) -> None:
                self._contract(index, grad, rows, n_pos)

            _, embed_grad = self.linear.grads(seeds, None if final_seed is None else final_seed[:, :n_pos], n_pos,
                                              consume=consume)
            if embed_grad is not None:
                self._contract(len(self.rm.sites), embed_grad, rows, n_pos)
            return
        for index, grad in enumerate(self._autograd_grads(seeds, final_seed, k)):
            if grad is not None:  # None: none of the seeded targets depends on this site
                self._contract(index, grad, rows, self.clean.n_pos)

    def _contract(self, index: int, grad: torch.Tensor, rows: torch.Tensor, n_pos: int) -> None:
        """Rows ``[k, n_cols]`` += what site ``index`` (the embeddings for ``n_sites``) sends: its error /
        embedding column per position, then its features' columns, from the gradient ``[k, n_pos, d_model]``."""
        k = grad.shape[0]  # the linear engine may hand on only the first (live) rows; the others stay zero
        rows = rows[:k]
        start = self.n_active + index * self.clean.n_pos
        rows[:, start:start + n_pos] = torch.einsum("kpd,pd->kp", grad, self.sources[index][:n_pos])
        for layout in self.site_layouts.get(index, ()):
            n_features = layout["before"][n_pos]  # features after n_pos receive nothing from the seeds
            padded = layout["padded_T"][:n_pos].to(self.device, non_blocking=True)
            by_position = torch.bmm(grad.transpose(0, 1), padded)  # [pos, k, slots]
            flat = by_position.transpose(0, 1).reshape(k, n_pos * layout["slots"])
            start, columns = layout["start"], layout["flat_index"][:n_features]
            if layout["accumulate"]:  # a CLT feature: its columns sum what it writes into every output
                rows[:, start:start + n_features] += flat[:, columns].to(rows.dtype)
            elif flat.dtype == rows.dtype:  # straight into the rows, no temporary
                torch.index_select(flat, 1, columns, out=rows[:, start:start + n_features])
            else:  # the autograd engine on a reduced-precision model
                rows[:, start:start + n_features] = flat[:, columns]

    def feature_seeds(self, features: torch.Tensor) -> tuple[dict[int, torch.Tensor | SparseSeed], int]:
        """Encoder directions of ``features`` (indices into the active list) at their sites' inputs, per
        site index (one vector per seeded row, at its feature's position), and the number of positions they
        span (last position + 1). The encoder columns are gathered where the dictionary's weights are.
        Features ordered by site, highest first, let the linear engine carry only the rows seeded so far."""
        seeds: dict[int, torch.Tensor | SparseSeed] = {}
        k = features.numel()
        row = torch.arange(k, device=features.device)
        sites = self.feature_site[features]
        for index in sites.unique().tolist():
            d = self.rm.sites[index].dictionary
            member = sites == index
            chosen = features[member]
            columns = d.W_enc.detach()[:, self.feature_id[chosen].to(d.W_enc.device)]
            vectors = (d.cfg.norm_scale * columns.T).to(self.device, self.dtype)
            rows = row[member]
            seeds[index] = SparseSeed(rows, self.feature_pos[chosen], vectors, k, int(rows.max()) + 1)
        return seeds, int(self.feature_pos[features].max()) + 1

"""A cross-layer transcoder's weights in training layout, its losses, and the export to ``CrossLayerTranscoder``.

Each source layer ``L`` is a transcoder from its MLP input to the MLP outputs ``L..n-1`` flattened into one row
(``W_dec[L] [d_sae, (n - L) * d_out]``): the unit-norm constraint, the decoder-norm-weighted L1 and the sparse
TopK kernels of per-layer training then apply row for row, and a latent's decoder norm is its norm over every
layer it writes (as in Ameisen et al. 2025). The layers' decodes add up into each output layer's reconstruction,
and the loss is the squared error summed over features and output layers, averaged over rows.

Inputs and targets arrive stacked ``[batch, n, d]`` and scaled per layer (``norm_scale[L]``,
``target_scale[M]``); :meth:`TrainableCrossLayer.export` folds both into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..dictionaries import CrossLayerTranscoder, Dictionary, DictionaryConfig
from .module import geometric_median
from .objectives import _JumpReLU, _Step
from .sparse_ops import gathered_pre_acts, sparse_decode

__all__ = ["TrainableCrossLayer", "CrossLayerStep", "cross_layer_loss"]


class TrainableCrossLayer(nn.Module):
    """Per source layer ``L``: ``W_enc_t[L] [d_sae, d_in]``, ``W_dec[L] [d_sae, (n - L) * d_out]``; ``b_enc [n, d_sae]``,
    ``b_dec [n, d_out]`` (per output layer), JumpReLU ``log_threshold [n, d_sae]``, BatchTopK ``threshold [n]``."""

    threshold: torch.Tensor  # a registered buffer (nn.Module's __getattr__ would type it Tensor | Module)

    def __init__(self, cfg: DictionaryConfig, device: str | torch.device = "cpu", init_threshold: float = 0.01,
                 init_scale: float = 0.1, unit_norm_decoder: bool = True) -> None:
        super().__init__()
        assert cfg.n_layers is not None and cfg.d_out is not None  # DictionaryConfig checks both for a CLT
        self.cfg = cfg
        n, d_in, d_sae, d_out = cfg.n_layers, cfg.d_in, cfg.d_sae, cfg.d_out
        self.n_layers = n

        def unit_rows(rows: int, cols: int) -> torch.Tensor:
            weights = torch.randn(rows, cols, device=device)
            return weights / weights.norm(dim=-1, keepdim=True)

        # Small initial activations, as for per-layer dictionaries (module.TrainableDictionary).
        self.W_enc_t = nn.ParameterList(nn.Parameter(unit_rows(d_sae, d_in) * init_scale) for _ in range(n))
        self.W_dec = nn.ParameterList(
            nn.Parameter(unit_rows(d_sae, (n - layer) * d_out) * (1.0 if unit_norm_decoder else init_scale))
            for layer in range(n))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, device=device))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, d_sae), float(init_threshold), device=device).log())
        self.register_buffer("threshold", torch.zeros(n, device=device))  # BatchTopK running estimates
        self.norm_scale = [1.0] * n  # inputs of layer L are multiplied by norm_scale[L] while training
        self.target_scale = [1.0] * n  # MLP output M by target_scale[M]

    def scales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n, 1], [n, 1])``: the input and target scales, to multiply ``[batch, n, d]`` rows."""
        return (torch.tensor(self.norm_scale, device=device)[:, None],
                torch.tensor(self.target_scale, device=device)[:, None])

    @torch.no_grad()
    def initialise_from(self, x_in: torch.Tensor, target: torch.Tensor, use_geometric_median: bool) -> None:
        """From a first batch (scaled, ``[batch, n, d]``): ``b_dec[M]`` at the geometric median of output ``M``;
        each decoder row at the image of its encoder row under the least-squares map from the layer's input to
        all the outputs it writes (one solve per source layer), as module.TrainableDictionary does for one."""
        n, batch = self.n_layers, x_in.shape[0]
        if use_geometric_median:
            for layer in range(n):
                self.b_dec[layer].copy_(geometric_median(target[:, layer].float()))
        centred_target = (target - target.mean(0)).double()
        for layer in range(n):
            x_centred = (x_in[:, layer] - x_in[:, layer].mean(0)).double()
            outputs = centred_target[:, layer:].reshape(batch, -1)
            linear_map = torch.linalg.lstsq(x_centred.cpu(), outputs.cpu()).solution.to(self.b_dec.device)
            W_dec = (self.W_enc_t[layer].double() @ linear_map).float()
            self.W_dec[layer].copy_(W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        for W_dec in self.W_dec:
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        for W_dec in self.W_dec:
            if W_dec.grad is not None:
                W_dec.grad.sub_((W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec)

    @torch.no_grad()
    def export(self) -> CrossLayerTranscoder:
        """The ``CrossLayerTranscoder`` (inference mode) reading and writing raw activations."""
        cfg = DictionaryConfig.from_dict({**self.cfg.to_dict(), "norm_scale": 1.0})
        clt = Dictionary.from_config(cfg, device=self.b_dec.device)
        assert isinstance(clt, CrossLayerTranscoder)
        n, d_out = self.n_layers, cfg.d_out
        target_scale = torch.tensor(self.target_scale, device=self.b_dec.device)
        for layer in range(n):
            clt.W_enc[layer].copy_((self.W_enc_t[layer] * self.norm_scale[layer]).t())
            block = self.W_dec[layer].reshape(cfg.d_sae, n - layer, d_out)
            clt.decoder(layer).copy_(block / target_scale[layer:, None])
        clt.b_enc.copy_(self.b_enc)
        clt.b_dec.copy_(self.b_dec / target_scale[:, None])
        if cfg.activation == "jumprelu":
            clt.set_threshold(self.log_threshold.exp())
        elif cfg.activation == "batchtopk":
            clt.set_threshold(self.threshold)
        return clt


@dataclass
class CrossLayerStep:
    loss: torch.Tensor  # scalar, differentiable
    reconstruction: torch.Tensor  # [batch, n, d_out]
    fire_counts: torch.Tensor  # [n, d_sae] int64: rows on which each latent fired
    l0: torch.Tensor  # [n]: mean active latents per row, per layer
    aux_loss: torch.Tensor  # scalar
    smallest_kept: torch.Tensor  # [n, 2] BatchTopK (smallest kept value, kept any); zeros otherwise


def _pre_acts(module: TrainableCrossLayer, x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.addmm(module.b_enc[layer], x, module.W_enc_t[layer].t())


def _layer_acts(module: TrainableCrossLayer, x: torch.Tensor, layer: int, architecture: str, k: int,
                bandwidth: float):
    """``(decoded [batch, (n - L) * d_out], fire_counts [d_sae], l0, sparsity term, pre (no grad) or None,
    smallest kept [2])`` of source ``layer``."""
    W_dec, zero = module.W_dec[layer], torch.zeros((), device=x.device)
    smallest = torch.zeros(2, device=x.device)
    if architecture == "topk":
        with torch.no_grad():
            pre = _pre_acts(module, x, layer)
            _, indices = pre.topk(k, dim=-1, sorted=False)
        values = gathered_pre_acts(x, module.W_enc_t[layer], module.b_enc[layer], indices, pre).relu()
        active = values > 0
        return (sparse_decode(indices, values, W_dec), torch.bincount(indices[active], minlength=W_dec.shape[0]),
                active.sum(-1).float().mean(), zero, pre, smallest)
    pre = _pre_acts(module, x, layer)
    sparsity = zero
    if architecture == "batchtopk":
        flat = pre.relu().reshape(-1)
        values, flat_indices = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
        acts = torch.zeros_like(flat).scatter(0, flat_indices, values).reshape(pre.shape)
        positive = values > 0
        low = values.detach().masked_fill(~positive, float("inf")).min()
        smallest = torch.stack([torch.where(positive.any(), low, torch.zeros_like(low)), positive.any().float()])
    elif architecture == "jumprelu":
        threshold = module.log_threshold[layer].exp()
        acts = _JumpReLU.apply(pre, threshold, bandwidth)
        sparsity = _Step.apply(pre, threshold, bandwidth).sum(-1).mean()
    else:  # relu: L1 weighted by each latent's decoder norm over all its output layers
        acts = pre.relu()
        sparsity = (acts.sum(0) * W_dec.norm(dim=-1)).sum() / acts.shape[0]
    active = acts > 0
    return acts @ W_dec, active.sum(0), active.sum(-1).float().mean(), sparsity, pre.detach(), smallest


def cross_layer_loss(module: TrainableCrossLayer, x: torch.Tensor, target: torch.Tensor, architecture: str, k: int,
                     sparsity_coefficient: float, bandwidth: float, dead: torch.Tensor | None, k_aux: int,
                     aux_coefficient: float) -> CrossLayerStep:
    """One step's loss on scaled ``x [batch, n, d_in]`` -> ``target [batch, n, d_out]``; ``dead [n, d_sae]``."""
    batch, n, d_out = target.shape
    reconstruction = module.b_dec.expand(batch, n, d_out).clone()
    fire_counts, l0s, sparsity, pres, smallest = [], [], torch.zeros((), device=x.device), [], []
    for layer in range(n):
        decoded, fired, l0, penalty, pre, kept = _layer_acts(module, x[:, layer], layer, architecture, k, bandwidth)
        reconstruction[:, layer:] += decoded.view(batch, n - layer, d_out)
        fire_counts.append(fired)
        l0s.append(l0)
        sparsity = sparsity + penalty
        pres.append(pre)
        smallest.append(kept)
    error = (reconstruction.float() - target.float()).pow(2).sum((-2, -1)).mean()
    aux = torch.zeros((), device=x.device)
    if architecture in ("topk", "batchtopk") and aux_coefficient > 0 and dead is not None and bool(dead.any()):
        residual = (target - reconstruction).detach()
        aux = _auxk(module, x, pres, residual, dead, k_aux)
    loss = error + sparsity_coefficient * sparsity + aux_coefficient * aux
    return CrossLayerStep(loss, reconstruction, torch.stack(fire_counts), torch.stack(l0s), aux.detach(),
                          torch.stack(smallest))


def _auxk(module: TrainableCrossLayer, x: torch.Tensor, pres: list[torch.Tensor], residual: torch.Tensor,
          dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024) per source layer: its top ``k_aux`` dead latents reconstruct the residual of the
    outputs it writes; the terms are normalised by that residual's size and averaged over the layers."""
    batch, n, d_out = residual.shape
    terms = []
    for layer in range(n):
        n_dead = int(dead[layer].sum())
        if n_dead == 0:
            continue
        _, indices = pres[layer].masked_fill(~dead[layer], float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
        values = gathered_pre_acts(x[:, layer], module.W_enc_t[layer], module.b_enc[layer], indices, pres[layer]).relu()
        wanted = residual[:, layer:].reshape(batch, -1).float()
        aux_recon = sparse_decode(indices, values, module.W_dec[layer]).float()
        terms.append((aux_recon - wanted).pow(2).sum(-1).mean() / wanted.pow(2).sum(-1).mean().clamp_min(1e-8))
    return torch.stack(terms).mean()

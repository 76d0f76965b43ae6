"""The parameters of a dictionary in training layout, and their round trip to ``Dictionary``.

Training keeps the encoder as ``W_enc_t [d_sae, d_in]`` (one contiguous row per latent) so the sparse
TopK backward writes whole rows; ``export`` transposes it back and folds the activation norm scale
into the weights, giving a ``Dictionary`` that reads raw activations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dictionaries import Dictionary, DictionaryConfig

__all__ = ["TrainableDictionary", "geometric_median"]


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points [n, d]`` -> ``[d]``."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


class TrainableDictionary(nn.Module):
    """Trainable weights of one dictionary: ``W_enc_t``, ``b_enc``, ``W_dec``, ``b_dec`` (+ ``W_skip``,
    JumpReLU ``log_threshold``, BatchTopK running ``threshold``), and the input ``norm_scale``."""

    def __init__(self, cfg: DictionaryConfig, device: str | torch.device = "cpu", init_threshold: float = 0.01,
                 init_scale: float = 0.1, unit_norm_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        template = Dictionary.from_config(cfg, device=device)  # shares the library's initialisation
        W_enc_t = template.W_enc.detach().t().contiguous()
        if cfg.kind != "sae":  # unit rows, like the SAE's tied start; the decoder follows in initialise_from
            W_enc_t = torch.randn_like(W_enc_t)
            W_enc_t /= W_enc_t.norm(dim=-1, keepdim=True)
        # Small initial activations (Anthropic's April 2024 update; sae-lens' decoder_init_norm=0.1): the first
        # reconstructions are near b_dec instead of k unit vectors' worth of noise, so short runs start well.
        self.W_enc_t = nn.Parameter(W_enc_t * init_scale)
        self.b_enc = nn.Parameter(template.b_enc.detach().clone())
        W_dec = template.W_dec.detach().clone()
        self.W_dec = nn.Parameter(W_dec if unit_norm_decoder else W_dec * init_scale)
        self.b_dec = nn.Parameter(template.b_dec.detach().clone())
        self.W_skip = nn.Parameter(template.W_skip.detach().clone()) if template.W_skip is not None else None
        if cfg.activation == "jumprelu":
            # Learned in log space so the threshold stays positive (Rajamanoharan et al. 2024).
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), float(init_threshold), device=device).log())
        self.register_buffer("threshold", torch.zeros((), device=device))  # BatchTopK running estimate
        self.norm_scale = 1.0  # inputs are multiplied by this while training
        self.target_scale = 1.0  # targets too (== norm_scale for an SAE; a transcoder's output has its own)

    @torch.no_grad()
    def export(self) -> Dictionary:
        """A ``Dictionary`` (inference mode) with the norm scale folded into its weights."""
        cfg = DictionaryConfig.from_dict({**self.cfg.to_dict(), "norm_scale": float(self.norm_scale)})
        dictionary = Dictionary.from_config(cfg, device=self.W_dec.device)
        # The Dictionary divides outputs by norm_scale; trained outputs are in target_scale units.
        output_ratio = self.norm_scale / self.target_scale
        dictionary.W_enc.copy_(self.W_enc_t.t())
        dictionary.b_enc.copy_(self.b_enc)
        dictionary.W_dec.copy_(self.W_dec * output_ratio)
        dictionary.b_dec.copy_(self.b_dec * output_ratio)
        if self.W_skip is not None:
            dictionary.W_skip.copy_(self.W_skip * output_ratio)
        if self.cfg.activation == "jumprelu":
            dictionary.activation.threshold.copy_(self.log_threshold.exp())
        elif self.cfg.activation == "batchtopk":
            dictionary.activation.threshold.copy_(self.threshold)
        return dictionary.fold_norm_scale()

    @torch.no_grad()
    def initialise_from(self, x_in: torch.Tensor, target: torch.Tensor, use_geometric_median: bool) -> None:
        """Data-dependent initialisation from a first batch (already norm-scaled).

        ``b_dec`` starts at the geometric median of the targets (Bricken et al. 2023): a robust centre,
        so the first latents learn directions rather than the mean.
        """
        if use_geometric_median:
            self.b_dec.copy_(geometric_median(target.float()).to(self.b_dec.dtype))
        if self.cfg.kind != "sae":
            # Transcoders: start each decoder row at the image of its encoder row under the best linear
            # map from inputs to targets (least squares on this batch). For an SAE that map is the identity,
            # i.e. the usual tied start; for a transcoder it starts latents consistent with the MLP's
            # linear part instead of making them unlearn a tie.
            x_centred = (x_in - x_in.mean(0)).double()
            target_centred = (target - target.mean(0)).double()
            linear_map = torch.linalg.lstsq(x_centred.cpu(), target_centred.cpu()).solution.to(self.W_dec.device)
            W_dec = (self.W_enc_t.double() @ linear_map).float()
            self.W_dec.copy_(W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale each decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row: it would only change norms
        that the constraint resets, and it disturbs Adam's moment estimates."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

"""Cross-layer transcoders: latents read at one layer's MLP input and write to that MLP's output and every later one.

A CLT over ``n`` layers has ``d_sae`` latents per layer. The latents of layer ``L`` read the MLP input there
(``hook_in`` with ``{layer} = L``) and write to the MLP outputs of layers ``L..n-1``, so the reconstruction of
MLP output ``M`` sums the decoders of every layer up to ``M`` (Ameisen et al. 2025, *Circuit Tracing*)::

    pre_acts[..., L, :]   = (s * x[..., L, :]) @ W_enc[L] + b_enc[L]                      [..., d_sae]
    feature_acts[..., L, :] = activation_L(pre_acts[..., L, :])                            [..., d_sae]
    reconstruction[..., M, :] = (sum_{L <= M} feature_acts[..., L, :] @ W_dec_L[:, M - L] + b_dec[M]) / s

``W_dec_L = decoder(L)`` is ``[d_sae, n - L, d_out]`` (circuit-tracer's ``W_dec_L``); all of them are stored in
one tensor ``W_dec [d_sae, n (n + 1) / 2, d_out]``, the blocks of layers 0, 1, ... side by side, so the decoders
take exactly ``sum_L d_sae * (n - L) * d_out`` numbers (:attr:`CrossLayerTranscoder.decoder_bytes`). Inputs
and outputs stack the layers on the axis before the features: ``x [..., n, d_in]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .activations import make_activation
from .base import _DTYPES, DICTIONARY_CLASSES, Dictionary, DictionaryOutput
from .config import LAYER_FIELD, DictionaryConfig

__all__ = ["CrossLayerTranscoder", "decoder_offset", "check_cross_layer_set", "stack_layers"]

KIND = "cross_layer_transcoder"


def decoder_offset(layer: int, n_layers: int) -> int:
    """Column of ``W_dec`` where the block of source ``layer`` starts: ``sum_{j < layer} (n_layers - j)``."""
    return layer * n_layers - layer * (layer - 1) // 2


class CrossLayerTranscoder(Dictionary):
    """A cross-layer transcoder (see the module docstring); build it with ``Dictionary.from_config``.

    Parameters: ``W_enc [n, d_in, d_sae]``, ``b_enc [n, d_sae]``, ``W_dec [d_sae, n (n + 1) / 2, d_out]``
    (per-layer views: :meth:`decoder`), ``b_dec [n, d_out]`` (the bias of each output layer), and one
    activation per layer (``activations[L]``: a JumpReLU's threshold ``[d_sae]``, a BatchTopK's ``[]``).
    """

    def __init__(self, cfg: DictionaryConfig, device: str | torch.device = "cpu") -> None:
        nn.Module.__init__(self)  # its own weight shapes; the base class's per-layer ones do not apply
        if cfg.kind != KIND or cfg.n_layers is None:
            raise ValueError(f"CrossLayerTranscoder needs a {KIND} config with n_layers; got kind={cfg.kind!r}.")
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        n, d_in, d_sae, d_out = cfg.n_layers, cfg.d_in, cfg.d_sae, cfg.d_out
        assert d_out is not None  # DictionaryConfig.__post_init__ sets it
        W_dec = torch.randn(d_sae, n * (n + 1) // 2, d_out, device=device, dtype=dtype)
        for layer in range(n):  # each latent's decoders (all its output layers together) at unit norm
            block = W_dec[:, decoder_offset(layer, n): decoder_offset(layer + 1, n)]
            block /= block.norm(dim=(-2, -1), keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(torch.randn(n, d_in, d_sae, device=device, dtype=dtype) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, device=device, dtype=dtype))
        self.W_skip = None
        # One module per layer: each layer's JumpReLU thresholds and BatchTopK selection are its own.
        self.activations = nn.ModuleList(
            make_activation(cfg.activation, d_sae, cfg.k).to(device=device, dtype=dtype) for _ in range(n))
        self.eval()

    # -- shape and placement -------------------------------------------------------------------

    @property
    def activation(self) -> nn.Module:  # type: ignore[override]
        """Layer 0's activation; every layer has one of the same kind (``elementwise``, ``k``)."""
        return self.activations[0]

    @property
    def n_layers(self) -> int:
        assert self.cfg.n_layers is not None  # DictionaryConfig checks it for this kind
        return self.cfg.n_layers

    @property
    def hooks_in(self) -> list[str]:
        """The hook each layer's latents read, layer by layer (``hook_in`` with ``{layer}`` filled)."""
        return [self.cfg.hook_in.replace(LAYER_FIELD, str(layer)) for layer in range(self.n_layers)]

    @property
    def hooks_out(self) -> list[str]:
        """The MLP output each layer's reconstruction replaces, layer by layer."""
        return [self.cfg.hook_out.replace(LAYER_FIELD, str(layer)) for layer in range(self.n_layers)]

    @property
    def decoder_bytes(self) -> int:
        """Bytes of the decoders: ``sum_{L=0}^{n-1} d_sae * (n - L) * d_out`` numbers, i.e.
        ``d_sae * n (n + 1) / 2 * d_out``, times the element size (``n (n + 1) / 2`` per-layer decoders'
        worth, against ``n`` for a set of per-layer transcoders)."""
        return self.W_dec.numel() * self.W_dec.element_size()

    @property
    def threshold(self) -> torch.Tensor | None:
        """``[n, d_sae]`` (JumpReLU) or ``[n]`` (BatchTopK) thresholds stacked over layers (a copy: set them with
        :meth:`set_threshold`), or None."""
        if getattr(self.activations[0], "threshold", None) is None:
            return None
        return torch.stack([activation.threshold for activation in self.activations])  # type: ignore[union-attr]

    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """Copy ``threshold`` (the shape :attr:`threshold` has) into the layers' activations."""
        for layer, activation in enumerate(self.activations):
            activation.threshold.copy_(threshold[layer])  # type: ignore[union-attr]

    def encoder(self, layer: int) -> torch.Tensor:
        """``[d_in, d_sae]``: the encoder of ``layer``'s latents (a view)."""
        return self.W_enc[layer]

    def decoder(self, layer: int) -> torch.Tensor:
        """``[d_sae, n - layer, d_out]``: the decoders of ``layer``'s latents into output layers ``layer..n-1``
        (a view of ``W_dec``; circuit-tracer's ``W_dec_{layer}``)."""
        n = self.n_layers
        return self.W_dec[:, decoder_offset(layer, n): decoder_offset(layer + 1, n)]

    def decoders_into(self, out_layer: int) -> torch.Tensor:
        """``[out_layer + 1, d_sae, d_out]``: what each source layer ``0..out_layer``'s latents write to MLP output
        ``out_layer`` (a copy)."""
        n = self.n_layers
        columns = [decoder_offset(layer, n) + out_layer - layer for layer in range(out_layer + 1)]
        return self.W_dec[:, columns].transpose(0, 1)

    # -- the computation ----------------------------------------------------------------------

    def _check_stacked(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.dim() < 2 or x.shape[-2] != self.n_layers or x.shape[-1] != width:
            raise ValueError(f"A cross-layer transcoder over {self.n_layers} layers takes {what} [..., {self.n_layers}, "
                             f"{width}] (the layers stacked before the features); got shape {tuple(x.shape)}.")

    def pre_acts_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``: pre-activations of ``layer``'s latents from that layer's input."""
        x = x.to(self.dtype)
        if self.cfg.norm_scale != 1.0:
            x = x * self.cfg.norm_scale
        return x @ self.W_enc[layer] + self.b_enc[layer]  # matmul then bias, as the base class (exact conversions)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``: feature activations of ``layer``'s latents."""
        return self.activations[layer](self.pre_acts_layer(x, layer))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n, d_in] -> [..., n, d_sae]``."""
        self._check_stacked(x, self.cfg.d_in, "inputs")
        x = x.to(self.dtype)
        if self.cfg.norm_scale != 1.0:
            x = x * self.cfg.norm_scale
        return torch.einsum("...ld,ldf->...lf", x, self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n, d_in] -> [..., n, d_sae]``: every layer's feature activations."""
        pre = self.pre_acts(x)
        return torch.stack([activation(pre[..., layer, :]) for layer, activation in enumerate(self.activations)], -2)

    def decode(self, feature_acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., n, d_sae] -> [..., n, d_out]``: every MLP output's reconstruction (``x`` is not used)."""
        self._check_stacked(feature_acts, self.cfg.d_sae, "feature activations")
        n, d_out = self.n_layers, self.cfg.d_out
        assert d_out is not None
        out = torch.zeros(*feature_acts.shape[:-1], d_out, device=feature_acts.device, dtype=self.dtype)
        for layer in range(n):  # one matmul per source layer, into all of its output layers at once
            block = self.decoder(layer).reshape(self.cfg.d_sae, (n - layer) * d_out)
            written = feature_acts[..., layer, :].to(self.dtype) @ block
            out[..., layer:, :] += written.reshape(*written.shape[:-1], n - layer, d_out)
        out = out + self.b_dec
        return out / self.cfg.norm_scale if self.cfg.norm_scale != 1.0 else out

    def decode_layer(self, feature_acts: torch.Tensor, out_layer: int) -> torch.Tensor:
        """``[..., m, d_sae]`` (the activations of layers ``0..m-1``, ``m > out_layer``) ``-> [..., d_out]``: the
        reconstruction of MLP output ``out_layer``, which needs no latents of later layers."""
        if feature_acts.dim() < 2 or feature_acts.shape[-2] <= out_layer or not 0 <= out_layer < self.n_layers:
            raise ValueError(f"decode_layer({out_layer}) needs the activations of layers 0..{out_layer} stacked as "
                             f"[..., >= {out_layer + 1}, d_sae]; got shape {tuple(feature_acts.shape)}.")
        sources = feature_acts[..., : out_layer + 1, :].to(self.dtype)
        out = torch.einsum("...lf,lfd->...d", sources, self.decoders_into(out_layer)) + self.b_dec[out_layer]
        return out / self.cfg.norm_scale if self.cfg.norm_scale != 1.0 else out

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("A cross-layer transcoder has no skip path.")

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """``[..., n, d_in] -> (reconstruction [..., n, d_out], feature_acts [..., n, d_sae])``."""
        feature_acts = self.encode(x)
        return DictionaryOutput(self.decode(feature_acts), feature_acts)

    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """``[n, d_sae]``: the L2 norm of each latent's decoders over all the layers it writes."""
        return torch.stack([self.decoder(layer).norm(dim=(-2, -1)) for layer in range(self.n_layers)])

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return (f"{c.kind}, {c.activation}{k}, {c.n_layers} layers x ({c.d_in}->{c.d_sae}->{c.d_out}), "
                f"{c.hook_in!r}->{c.hook_out!r}, decoders {self.decoder_bytes / 2**20:.1f} MiB")


DICTIONARY_CLASSES[KIND] = CrossLayerTranscoder


def check_cross_layer_set(dictionaries: Iterable[Dictionary], n_layers: int | None = None) -> None:
    """Raise ``ValueError`` when a CLT in ``dictionaries`` cannot be used with the others or with a model of
    ``n_layers`` layers: a layer count that differs from the model's, two CLTs, or another dictionary that writes
    an MLP output a CLT already reconstructs."""
    dictionaries = list(dictionaries)
    clts = [d for d in dictionaries if isinstance(d, CrossLayerTranscoder)]
    if not clts:
        return
    if len(clts) > 1:
        raise ValueError(f"{len(clts)} cross-layer transcoders given; each one writes every MLP output, so use one.")
    (clt,) = clts
    if n_layers is not None and clt.n_layers != n_layers:
        raise ValueError(f"The cross-layer transcoder ({clt.cfg.hook_in!r} -> {clt.cfg.hook_out!r}, trained on "
                         f"{clt.cfg.model_name or 'an unnamed model'}) spans {clt.n_layers} layers but the model has "
                         f"{n_layers}: it was made for another model. Load the CLT made for this one.")
    written = dict(zip(clt.hooks_out, range(clt.n_layers), strict=True))
    for other in dictionaries:
        if other is not clt and other.cfg.hook_out in written:
            raise ValueError(
                f"The {other.cfg.kind} {other.cfg.hook_in!r} -> {other.cfg.hook_out!r} writes MLP output "
                f"{written[other.cfg.hook_out]}, which the cross-layer transcoder already reconstructs: one MLP cannot "
                "have two replacements. Drop that transcoder, or use per-layer transcoders without the CLT.")


def stack_layers(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """``n`` tensors ``[..., d]`` (one per layer, in layer order) -> ``[..., n, d]``, a CLT's input layout."""
    return torch.stack(list(activations), dim=-2)

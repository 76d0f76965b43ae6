"""One source layer of a cross-layer transcoder, seen as the dictionary of that layer's MLP site.

The replacement model splices a CLT in as one site per MLP, like a set of per-layer transcoders: site ``L``
reads the CLT's layer-``L`` input and its features are the CLT's layer-``L`` latents. What differs is where
they write: into MLP output ``L`` and every later one. :class:`CrossLayerSlice` gives the per-site code the
encoder side of layer ``L`` as a :class:`Dictionary` (``pre_acts``, ``encode``, ``W_enc [d_in, d_sae]``,
``b_enc``, ``activation``, ``threshold``) and :meth:`CrossLayerSlice.writes` the decoders into each output
layer; the replacement model sums what every source layer writes into an output.

A slice holds no parameters of its own: its tensors are views of the CLT's, so training, offloading or
editing the CLT shows through every slice.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Dictionary, DictionaryOutput
from .config import DictionaryConfig
from .cross_layer import CrossLayerTranscoder

__all__ = ["CrossLayerSlice", "cross_layer_slices"]


class CrossLayerSlice(Dictionary):
    """The latents of source layer ``layer`` of ``source`` (a :class:`CrossLayerTranscoder`)."""

    def __init__(self, source: CrossLayerTranscoder, layer: int) -> None:
        nn.Module.__init__(self)
        if not 0 <= layer < source.n_layers:
            raise ValueError(f"The cross-layer transcoder has layers 0..{source.n_layers - 1}; got layer {layer}.")
        # not a registered submodule: the CLT's parameters belong to the CLT alone (a slice has none)
        self.__dict__["source"] = source
        self.__dict__["layer"] = layer
        self.W_skip = None

    source: CrossLayerTranscoder
    layer: int

    @property
    def cfg(self) -> DictionaryConfig:  # type: ignore[override]
        """A transcoder's config for this layer's site (built from the CLT's, so it follows edits to it)."""
        c, layer = self.source.cfg, self.layer
        return DictionaryConfig(
            d_in=c.d_in, d_sae=c.d_sae, d_out=c.d_out, kind="transcoder", activation=c.activation, k=c.k,
            hook_in=self.source.hooks_in[layer], hook_out=self.source.hooks_out[layer], layer=layer,
            model_name=c.model_name, model_revision=c.model_revision, norm_scale=c.norm_scale, dataset=c.dataset,
            training_tokens=c.training_tokens, dtype=c.dtype, extra={"cross_layer_source_layer": layer})

    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        """``[d_in, d_sae]`` (a view of the CLT's)."""
        return self.source.W_enc[self.layer]

    @property
    def b_enc(self) -> torch.Tensor:  # type: ignore[override]
        return self.source.b_enc[self.layer]

    @property
    def b_dec(self) -> torch.Tensor:  # type: ignore[override]
        """``[d_out]``: the bias of this layer's MLP output (every source layer up to it writes there too)."""
        return self.source.b_dec[self.layer]

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """``[d_sae, d_out]``: all a latent writes, summed over its output layers (in a model whose MLPs are
        replaced, what reaches the residual stream directly; a copy). The per-layer decoders: :meth:`writes`."""
        return self.source.decoder(self.layer).sum(dim=1)

    @property
    def activation(self) -> nn.Module:  # type: ignore[override]
        return self.source.activations[self.layer]

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    @property
    def threshold(self) -> torch.Tensor | None:
        return getattr(self.activation, "threshold", None)

    def writes(self) -> list[tuple[int, torch.Tensor]]:
        """``(output layer M, decoder [d_sae, d_out])`` for ``M = layer .. n - 1`` (views, in the CLT's normalised
        units: divide what they write by ``cfg.norm_scale``)."""
        decoders = self.source.decoder(self.layer)
        return [(self.layer + offset, decoders[:, offset]) for offset in range(decoders.shape[1])]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``."""
        return self.source.pre_acts_layer(x, self.layer)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]``."""
        return self.source.encode_layer(x, self.layer)

    def decode(self, feature_acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        raise ValueError(
            f"Layer {self.layer}'s latents of a cross-layer transcoder write MLP outputs {self.layer}.."
            f"{self.source.n_layers - 1}, not one output: decode the whole CLT (CrossLayerTranscoder.decode / "
            "decode_layer) or run it spliced in with ReplacementModel.")

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        raise ValueError("A slice of a cross-layer transcoder has no reconstruction of its own; run the CLT itself.")

    def fold_norm_scale(self) -> Dictionary:
        self.source.fold_norm_scale()
        return self

    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """``[d_sae]``: each latent's decoder norm over all the layers it writes."""
        return self.source.decoder(self.layer).norm(dim=(-2, -1))

    def extra_repr(self) -> str:
        return f"layer {self.layer} of a cross-layer transcoder over {self.source.n_layers} layers"


def cross_layer_slices(clt: CrossLayerTranscoder) -> list[CrossLayerSlice]:
    """One slice per source layer, in layer order."""
    return [CrossLayerSlice(clt, layer) for layer in range(clt.n_layers)]

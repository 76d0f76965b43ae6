"""The one ``Dictionary`` type: an encoder/decoder pair with a sparsifying activation.

An SAE reads and writes the same hook; a transcoder reads an MLP's input and predicts its output; a
skip transcoder adds a dense linear path ``x @ W_skip``. All three share these weights and code:

    pre_acts      = (s * x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc          [..., d_sae]
    feature_acts  = activation(pre_acts)                                              [..., d_sae]
    reconstruction = (feature_acts @ W_dec + b_dec + s * x @ W_skip) / s             [..., d_out]

with ``s = cfg.norm_scale`` (1 once folded).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .activations import make_activation
from .config import DictionaryConfig

__all__ = ["Dictionary", "DictionaryOutput", "SAE", "Transcoder", "SkipTranscoder", "DICTIONARY_CLASSES"]


class DictionaryOutput(NamedTuple):
    reconstruction: torch.Tensor  # [..., d_out]
    feature_acts: torch.Tensor  # [..., d_sae]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Dictionary(nn.Module):
    """Base class of SAEs and transcoders; construct with :meth:`from_config` to get the right kind."""

    def __init__(self, cfg: DictionaryConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        assert d_out is not None  # DictionaryConfig.__post_init__ sets it (to d_in by default)
        # Encoder initialised as the decoder's transpose, decoder rows at unit norm: the usual start
        # for every architecture (Conerly et al. 2024; Gao et al. 2024).
        W_dec = torch.randn(d_sae, d_out, device=device, dtype=dtype)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        W_enc = (torch.randn(d_in, d_sae, device=device, dtype=dtype) / d_in**0.5 if d_in != d_out
                 else W_dec.T.clone())
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        self.W_skip = (nn.Parameter(torch.zeros(d_in, d_out, device=device, dtype=dtype))
                       if cfg.kind == "skip_transcoder" else None)
        self.activation = make_activation(cfg.activation, d_sae, cfg.k).to(device=device, dtype=dtype)
        # Inference mode by default: BatchTopK only selects across the batch while training.
        self.eval()

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def from_config(cfg: DictionaryConfig, device: str | torch.device = "cpu") -> Dictionary:
        return DICTIONARY_CLASSES[cfg.kind](cfg, device=device)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def threshold(self) -> torch.Tensor | None:
        """Per-feature (JumpReLU) or global (BatchTopK) threshold, if the activation has one."""
        return getattr(self.activation, "threshold", None)

    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """Copy ``threshold`` (the shape :attr:`threshold` has) into the activation."""
        current = self.threshold
        if current is None:
            raise ValueError(f"A {self.cfg.activation} dictionary has no threshold to set.")
        current.copy_(threshold)

    # -- the computation ----------------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` encoder pre-activations."""
        x = x.to(self.dtype)
        if self.cfg.norm_scale != 1.0:
            x = x * self.cfg.norm_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        # Matmul then bias add, as sae-lens computes it: a fused addmm rounds differently once d_in or
        # d_sae is in the hundreds, and converted dictionaries must give bit-identical outputs.
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` feature activations."""
        return self.activation(self.pre_acts(x))

    def decode(self, feature_acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]``; a skip transcoder also needs its input ``x`` ``[..., d_in]``."""
        out = feature_acts @ self.W_dec + self.b_dec  # not addmm: see pre_acts
        if self.W_skip is not None:
            if x is None:
                raise ValueError("A skip transcoder's decode needs the input x for its W_skip path.")
            out = out + self.skip(x)
        if self.cfg.norm_scale != 1.0:
            out = out / self.cfg.norm_scale
        return out

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The dense skip path ``[..., d_in] -> [..., d_out]`` (in normalised units); zero for others."""
        if self.W_skip is None:
            assert self.cfg.d_out is not None  # set by DictionaryConfig.__post_init__
            return torch.zeros(*x.shape[:-1], self.cfg.d_out, device=x.device, dtype=self.dtype)
        return (x.to(self.dtype) * self.cfg.norm_scale) @ self.W_skip

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """``[..., d_in] -> (reconstruction [..., d_out], feature_acts [..., d_sae])``."""
        feature_acts = self.encode(x)
        return DictionaryOutput(self.decode(feature_acts, x), feature_acts)

    # -- weight surgery -----------------------------------------------------------------------

    @torch.no_grad()
    def fold_norm_scale(self) -> Dictionary:
        """Fold ``cfg.norm_scale`` into the weights so the dictionary reads raw activations."""
        scale = self.cfg.norm_scale
        if scale != 1.0:
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)
            # The skip path's input and output scales cancel: x*s @ W_skip / s.
            self.cfg.norm_scale = 1.0
        return self

    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """``[d_sae]`` L2 norm of each feature's decoder row."""
        return self.W_dec.norm(dim=-1)

    def check_input_width(self, width: int, where: str) -> None:
        """Raise a clear error when an activation of ``width`` cannot feed this dictionary."""
        if width != self.cfg.d_in:
            raise ValueError(
                f"Dictionary for hook {self.cfg.hook_in!r} (model {self.cfg.model_name or 'unknown'}) expects "
                f"d_in={self.cfg.d_in} but {where} has width {width}: this dictionary was trained for "
                "another model or hook. Load the dictionaries that match the model."
            )

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return f"{c.kind}, {c.activation}{k}, {c.d_in}->{c.d_sae}->{c.d_out}, {c.hook_in!r}->{c.hook_out!r}"

    # -- files (thin wrappers over featcircuits.dictionaries.io) ------------------------------

    def save(self, path: str, format: str = "native") -> None:
        """Write the dictionary to directory ``path`` in ``format`` (native, saelens, ...)."""
        from .io import save_dictionary

        save_dictionary(self, path, format=format)

    @staticmethod
    def load(path: str, device: str | torch.device = "cpu") -> Dictionary:
        """Read a dictionary from ``path`` in any supported format (detected)."""
        from .io import load_dictionary

        return load_dictionary(path, device=device)

    @staticmethod
    def from_pretrained(
        release: str, id: str | int, revision: str | None = None, device: str | torch.device = "cpu"
    ) -> Dictionary:
        """Deprecated: ``fc.load_dictionaries(release, ids=[id], revision=...)[0]`` (the one way to load)."""
        import warnings

        from ..hub.loading import from_pretrained

        warnings.warn("Dictionary.from_pretrained is deprecated; use fc.load_dictionaries(release, ids=[id]).",
                      DeprecationWarning, stacklevel=2)
        return from_pretrained(release, id, revision=revision, device=device)


class SAE(Dictionary):
    """Sparse autoencoder: reconstructs the activation at ``hook_in`` (== ``hook_out``)."""


class Transcoder(Dictionary):
    """Reads an MLP's input (``hook_in``) and predicts its output (``hook_out``)."""


class SkipTranscoder(Transcoder):
    """Transcoder with a dense linear skip path ``W_skip`` ``[d_in, d_out]``."""


DICTIONARY_CLASSES: dict[str, type[Dictionary]] = {
    "sae": SAE,
    "transcoder": Transcoder,
    "skip_transcoder": SkipTranscoder,
}

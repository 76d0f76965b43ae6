"""The one configuration every dictionary carries, whatever its kind, activation or file format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .activations import ACTIVATIONS

__all__ = ["DictionaryConfig", "KINDS", "LAYER_FIELD"]

KINDS = ("sae", "transcoder", "skip_transcoder", "cross_layer_transcoder")
# Where a cross-layer transcoder's hook templates name the layer: ``blocks.{layer}.ln2.hook_normalized``.
LAYER_FIELD = "{layer}"


@dataclass
class DictionaryConfig:
    """Shape, placement and provenance of a dictionary.

    ``norm_scale`` is the activation normalisation factor: inputs are multiplied by it before encoding
    and reconstructions divided by it after decoding. ``Dictionary.fold_norm_scale`` folds it into the
    weights (and sets it back to 1), which is how dictionaries are saved for inference.
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    kind: str = "sae"
    activation: str = "relu"
    k: int | None = None
    hook_in: str = ""
    hook_out: str = ""
    layer: int | None = None
    n_layers: int | None = None  # cross-layer transcoders only: the layers 0..n_layers-1 it reads and writes
    model_name: str = ""
    model_revision: str | None = None
    apply_b_dec_to_input: bool = False
    norm_scale: float = 1.0
    dataset: str = ""
    training_tokens: int = 0
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        if not self.hook_out:
            self.hook_out = self.hook_in
        if self.kind not in KINDS:
            raise ValueError(f"Unknown dictionary kind {self.kind!r}; expected one of {KINDS}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown architecture/activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}."
            )
        if self.kind == "sae" and self.d_out != self.d_in:
            raise ValueError(f"An SAE reconstructs its input: d_out={self.d_out} must equal d_in={self.d_in}.")
        if self.kind != "sae" and self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input needs d_out == d_in; transcoders cannot subtract b_dec.")
        if self.kind == "cross_layer_transcoder":
            self._check_cross_layer()
        elif self.n_layers is not None:
            raise ValueError(f"n_layers={self.n_layers} is for cross-layer transcoders; a {self.kind} has one layer "
                             "(set layer instead, or kind=cross_layer_transcoder).")
        for name in ("d_in", "d_sae", "d_out"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    def _check_cross_layer(self) -> None:
        if not isinstance(self.n_layers, int) or isinstance(self.n_layers, bool) or self.n_layers < 1:
            raise ValueError(f"A cross_layer_transcoder needs n_layers, a positive integer (the model's layer count); "
                             f"got {self.n_layers!r}.")
        if self.layer is not None:
            raise ValueError(f"A cross_layer_transcoder spans layers 0..{self.n_layers - 1}; layer={self.layer} must "
                             "be None.")
        for name in ("hook_in", "hook_out"):
            hook = getattr(self, name)
            if hook and hook.count(LAYER_FIELD) != 1:
                raise ValueError(f"A cross_layer_transcoder's {name} is a template with one {LAYER_FIELD} "
                                 f"(e.g. 'blocks.{LAYER_FIELD}.hook_mlp_out'); got {hook!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DictionaryConfig:
        """Build a config from a dict, ignoring keys this version does not know (kept in ``extra``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("d_in", "d_sae") if name not in data]
        if missing:
            raise ValueError(f"{source} lacks required field(s) {missing}.")
        extra = dict(data.get("extra") or {})
        extra.update({key: value for key, value in data.items() if key not in known})
        try:
            return cls(**{key: value for key, value in data.items() if key in known and key != "extra"}, extra=extra)
        except ValueError as err:  # name the file the bad value came from
            raise ValueError(f"{source}: {err}") from None

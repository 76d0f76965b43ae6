"""``TrainConfig``: the one typed description of a training run, loadable from YAML/JSON with overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .defaults import default_batch_size

__all__ = ["TrainConfig", "load_train_config", "apply_overrides", "coerce_field", "ARCHITECTURES"]

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")

# Fields that do not change what a run computes: where it writes, what it shows, how often it logs,
# evaluates or checkpoints, and where it runs. Every other field is compared when a run resumes.
_RESUME_FREE = frozenset({
    "out", "resume", "overwrite", "progress", "log_every", "eval_every", "checkpoint_every", "wandb", "wandb_project",
    "device", "compile", "compile_backend",
})

_KL_FIELDS = frozenset({"kl_coefficient", "kl_fraction", "kl_sequences"})


@dataclass
class TrainConfig:
    """A training run: which activations, which dictionaries, how to optimise them, where to write.

    ``hooks`` lists the input hook of every dictionary; ``hooks_out`` (same length, or empty) the hook it
    predicts: empty means SAEs; given means transcoders (``kind`` ``transcoder`` or ``skip_transcoder``).
    All dictionaries train from the same model forward (or the same cached rows).
    """

    hooks: list[str] = field(default_factory=list)
    hooks_out: list[str] = field(default_factory=list)
    model: str = ""  # local HF checkpoint dir or TransformerLens name; optional with a cache dataset
    # A text file or directory of them, a .jsonl/.parquet/.arrow file (text or input_ids/tokens column), a
    # Hugging Face dataset id or local dataset repository (streamed), or a `featcircuits cache` directory.
    dataset: str = ""
    dataset_split: str = "train"  # Hugging Face datasets: the split to stream
    dataset_config: str = ""  # Hugging Face datasets: the configuration (subset) name, if it has several
    text_column: str = "text"  # record datasets: the text column (else a pre-tokenized input_ids/tokens one)
    repeat_dataset: bool = True  # re-read a dataset that ends before total_tokens (epochs); off: refuse
    out: str = "runs/train"
    kind: str = ""  # "" -> sae when hooks_out is empty, else transcoder
    architecture: str = "topk"
    k: int = 32
    d_sae: int = 0  # 0 -> expansion_factor * d_in
    expansion_factor: int = 8
    total_tokens: int = 1_000_000
    # Defaults that scale with the run (featcircuits.training.defaults): batch_size 0 -> from total_tokens,
    # lr 0 -> from the dictionary width, lr_warmup_steps -1 -> a share of the steps (0: no warm-up).
    batch_size: int = 0  # activation rows (tokens) per optimiser step, across all ranks
    lr: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = -1
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of steps
    l1_coefficient: float = 5.0  # relu: penalty on sum_i f_i * ||W_dec_i||
    l0_coefficient: float = 1.0  # jumprelu: penalty on the expected number of active features
    sparsity_warmup_steps: int = 0  # sparsity coefficient ramps linearly from 0 over these steps
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    unit_norm_decoder: bool | None = None  # None -> True for topk/batchtopk, False otherwise
    # Matryoshka (Bussmann et al. 2025; Nabeshima 2024): latent counts m_1 < m_2 < ... < d_sae whose own
    # reconstructions (latents 0..m_i only) are also fitted; the loss averages their error with the full one.
    matryoshka_prefixes: list[int] = field(default_factory=list)
    auxk_coefficient: float = 1 / 32
    auxk_k: int = 0  # 0 -> d_in // 2
    dead_after_tokens: int = 10_000_000
    batchtopk_threshold_momentum: float = 0.99  # running threshold estimate (mid-training evaluation only)
    batchtopk_calibration_batches: int = 8  # fresh batches that set the final inference threshold; 0 -> running
    normalize_activations: bool = True  # scale inputs to mean norm sqrt(d_in); folded into weights on save
    init_b_dec_geometric_median: bool = True
    init_scale: float = 0.1  # initial encoder row norm (and decoder row norm when it is not constrained)
    context_size: int = 128
    model_batch_size: int = 32  # sequences per model forward
    buffer_bytes: int = 256 * 2**20  # memory budget of the shuffled activation buffer (all hooks)
    # Token rows are shuffled through a buffer of this many tokens (4 bytes each) before the model runs on
    # them, so early steps do not see only the corpus's start; 0 streams rows in dataset order.
    shuffle_buffer_tokens: int = 2**21
    drop_special_tokens: bool = True  # BOS/EOS/pad/unk positions never reach a dictionary
    # End-to-end fine-tuning (training.kl_objective): over the final kl_fraction of the steps each dictionary's
    # loss adds kl_coefficient * KL(model || model with every dictionary spliced in), in nats per token, on
    # kl_sequences token rows per step (0 -> batch_size // context_size). 0 turns it off; needs a text dataset.
    kl_coefficient: float = 0.0
    kl_fraction: float = 0.1
    kl_sequences: int = 0
    seed: int = 0
    device: str = ""  # "" -> cuda when available, else cpu
    dtype: str = "float32"
    autocast: bool = True  # bf16 autocast of the dictionary forward on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the ReLU/JumpReLU losses (TopK/BatchTopK run their own sparse kernels)
    compile_backend: str = "inductor"  # aot_eager needs no C++ compiler/Triton
    log_every: int = 50
    eval_every: int = 0  # 0 -> evaluate only at the end
    eval_sequences: int = 16  # sequences for the CE/KL evaluation with the dictionaries spliced in
    checkpoint_every: int = 0  # steps; 0 -> no checkpoints
    resume: bool = False
    overwrite: bool = False  # replace a finished run in ``out`` (its dictionaries this run does not write go)
    distribute_dictionaries: bool = False  # with several ranks: each rank trains its share of dictionaries
    wandb: bool = False
    wandb_project: str = "featcircuits"
    progress: bool = True

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for item in dataclasses.fields(self):
            setattr(self, item.name, coerce_field(item.name, getattr(self, item.name), hints[item.name]))
        if not self.kind:
            self.kind = "transcoder" if self.hooks_out else "sae"

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first inconsistent field and how to fix it."""
        if not self.hooks:
            raise ValueError("TrainConfig.hooks is empty: name at least one hook, e.g. blocks.0.hook_resid_post.")
        if self.hooks_out and len(self.hooks_out) != len(self.hooks):
            raise ValueError(
                f"hooks_out has {len(self.hooks_out)} entries but hooks has {len(self.hooks)}: give one output "
                "hook per input hook (transcoders), or none (SAEs)."
            )
        if self.kind == "sae" and self.hooks_out and self.hooks_out != self.hooks:
            raise ValueError("kind=sae reconstructs its input hook; drop hooks_out or set kind=transcoder.")
        if self.kind != "sae" and not self.hooks_out:
            raise ValueError(f"kind={self.kind} needs hooks_out (the hook each transcoder predicts).")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}; choose one of {ARCHITECTURES}.")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues the run in out, "
                             "--overwrite replaces it; give one.")
        if not self.dataset:
            raise ValueError("TrainConfig.dataset is empty: give a text file or directory, a jsonl/parquet/arrow file, a "
                             "Hugging Face dataset id, or an activation cache directory.")
        for name in ("total_tokens", "context_size", "model_batch_size", "buffer_bytes", "k", "expansion_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")
        for name in ("batch_size", "d_sae", "sparsity_warmup_steps", "shuffle_buffer_tokens", "auxk_k", "dead_after_tokens",
                     "batchtopk_calibration_batches", "eval_sequences", "eval_every", "checkpoint_every", "seed",
                     "kl_sequences"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be zero or positive, got {getattr(self, name)}.")
        if self.lr_warmup_steps < -1:
            raise ValueError(f"TrainConfig.lr_warmup_steps={self.lr_warmup_steps}: give a number of steps, 0 for no "
                             "warm-up, or -1 for a share of the run's steps.")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"TrainConfig.lr={self.lr} trains nothing (or diverges): give a positive learning rate, "
                             "e.g. lr=1e-3, or 0 to take it from the dictionary width.")
        for name in ("l1_coefficient", "l0_coefficient", "auxk_coefficient", "jumprelu_bandwidth", "init_scale",
                     "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value}.")
        if not (math.isfinite(self.kl_coefficient) and self.kl_coefficient >= 0):
            raise ValueError(f"TrainConfig.kl_coefficient={self.kl_coefficient} must be a finite number >= 0 (the weight "
                             "of the end-to-end KL term; 0 turns it off), e.g. kl_coefficient=10.")
        if not 0 < self.kl_fraction <= 1:
            raise ValueError(f"TrainConfig.kl_fraction={self.kl_fraction} must lie in (0, 1]: the final share of the "
                             "steps that add the KL term, e.g. 0.1 (1 for the whole run).")
        for name in ("lr_decay_fraction", "batchtopk_threshold_momentum"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"TrainConfig.{name} must lie in [0, 1], got {value}.")
        if any(not 0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"TrainConfig.adam_betas={list(self.adam_betas)} must each lie in [0, 1).")
        prefixes = list(self.matryoshka_prefixes)
        if prefixes and (any(m < 1 for m in prefixes) or prefixes != sorted(set(prefixes))):
            raise ValueError(
                f"matryoshka_prefixes={prefixes} must be strictly increasing positive latent counts below d_sae, "
                "e.g. [128, 512, 2048] for d_sae 4096."
            )
        if self.total_tokens < self.effective_batch_size:
            raise ValueError(
                f"total_tokens={self.total_tokens} is less than one batch (batch_size={self.effective_batch_size})."
            )

    @property
    def effective_batch_size(self) -> int:
        """``batch_size``, or the one chosen from ``total_tokens`` when it is 0."""
        return self.batch_size or default_batch_size(self.total_tokens)

    @property
    def n_steps(self) -> int:
        return self.total_tokens // self.effective_batch_size

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``(hook_in, hook_out)`` of every dictionary."""
        return list(zip(self.hooks, self.hooks_out or self.hooks, strict=False))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source} has unknown field(s) {unknown}; known fields: {sorted(known)}.")
        hints = get_type_hints(cls)
        data = {key: coerce_field(key, value, hints[key], source) for key, value in data.items()}
        return cls(**data)

    def resume_fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpointed one."""
        # With the KL term off its settings change nothing (and checkpoints from before them still resume).
        free = _RESUME_FREE | (_KL_FIELDS if self.kl_coefficient == 0 else frozenset())
        return {name: value for name, value in self.to_dict().items() if name not in free}


def _expected(annotation: Any) -> str:
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation).replace("typing.", ""))


def _scalar(name: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` as ``annotation`` (bool, int, float or str), refusing anything that is not plainly one."""
    def refuse() -> ValueError:
        return ValueError(f"{source}: {name}={value!r} is not {_expected(annotation)}; write e.g. "
                          f"{name}={ {bool: 'true', int: '256', float: '3e-4', str: 'text'}[annotation]}.")

    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise refuse()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise refuse()
    if isinstance(value, bool):  # bool is an int subclass: `lr: yes` is not 1.0
        raise refuse()
    if isinstance(value, str):
        try:
            value = float(value) if annotation is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            raise refuse() from None
    if annotation is float and isinstance(value, (int, float)):
        return float(value)
    if annotation is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    raise refuse()


def coerce_field(name: str, value: Any, annotation: Any, source: str = "TrainConfig") -> Any:
    """Check (and, from text, parse) one field's value strictly by its type; raise naming field, value and type.

    Booleans come only from booleans or the strings ``"true"``/``"false"``; integers from integral values;
    floats from numbers (or number text: YAML 1.1 reads ``1e-3`` as a string). Lists accept YAML lists or
    comma-separated text.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return coerce_field(name, value, inner, source)
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            items: Any = _yaml_list(name, text, source) if text.startswith("[") else [
                item.strip() for item in text.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{source}: {name}={value!r} is not a list; write e.g. {name}=a,b or {name}=[a, b].")
        element = args[0]
        checked = [_scalar(f"{name}[{index}]", item, element, source) for index, item in enumerate(items)]
        if origin is tuple:
            if len(checked) != len(args):
                raise ValueError(f"{source}: {name}={value!r} needs {len(args)} numbers, e.g. {name}=0.9,0.999.")
            return tuple(checked)
        return checked
    return _scalar(name, value, annotation, source)


def _yaml_list(name: str, text: str, source: str) -> list[Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list):
        raise ValueError(f"{source}: {name}={text!r} is not a list; write e.g. {name}=a,b or {name}=[a, b].")
    return value


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings, each parsed strictly by its field's type (see :func:`coerce_field`)."""
    hints = get_type_hints(TrainConfig)
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set lr=3e-4.")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise ValueError(f"--set {key}: TrainConfig has no field {key!r}; known: {sorted(hints)}.")
        data[key] = coerce_field(key, text.strip(), hints[key], source="--set")
    return TrainConfig.from_dict(data, source="--set overrides")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file, then apply ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No training config at {path}; give a YAML or JSON file.")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of TrainConfig fields, not {type(data).__name__}.")
    config = TrainConfig.from_dict(data, source=str(path))
    return apply_overrides(config, overrides or [])

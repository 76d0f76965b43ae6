"""The training loop: one activation batch per step feeds every dictionary; logs, checkpoints, resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..dictionaries import Dictionary
from . import distributed
from .checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .dictionary_trainer import DictionaryTrainer
from .metrics import MetricLogger
from .store import ActivationStore

__all__ = ["Trainer", "TrainingDivergedError", "MAX_FINAL_FVU"]

EvalFn = Callable[[list[Dictionary]], list[dict[str, float]]]

# A final FVU above this is no reconstruction at all (predicting the mean scores 1): the optimiser diverged
# (e.g. a TopK run at lr=1e12 ends at FVU 4e23 with finite weights). Such a run fails instead of being saved.
MAX_FINAL_FVU = 1e3
# Metrics that are finite for any usable dictionary (CE recovered may be NaN when zero ablation costs nothing).
_MUST_BE_FINITE = ("fvu", "mse", "l0", "ce_spliced", "kl")


class TrainingDivergedError(FloatingPointError, ValueError):
    """Training produced non-finite weights or metrics, or an absurd FVU; nothing was saved.

    A ``ValueError`` too, so that the command line reports it as a one-line error.
    """


class Trainer:
    """Trains ``trainers`` (one per dictionary) from ``store``.

    Args:
        store: serves batches; with ``rank_slice`` it serves the global batch and this rank keeps its slice
            (cheap sources such as the disk cache), otherwise it serves this rank's own rows.
        eval_fn: dictionaries -> per-dictionary metrics with the model (CE, KL, ...); None without a model.
        kl_objective: the end-to-end KL term (``kl_objective.SplicedKL``): before each step it may hand every
            trainer extra gradients; its stream is checkpointed and its training KL logged as ``train_kl``.
    """

    def __init__(self, config: TrainConfig, trainers: list[DictionaryTrainer], names: list[str],
                 store: ActivationStore, rank_slice: slice | None = None, eval_fn: EvalFn | None = None,
                 kl_objective: Any = None) -> None:
        self.config, self.trainers, self.names, self.store = config, trainers, names, store
        self.rank_slice, self.eval_fn, self.kl_objective = rank_slice, eval_fn, kl_objective
        self.rank = distributed.rank()
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # -- batches ---------------------------------------------------------------------------------

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.rank_slice is None:
            return batch
        return {hook: rows[self.rank_slice] for hook, rows in batch.items()}

    def _global(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole global batch on every rank (for initialisation statistics)."""
        if self.rank_slice is not None or not any(t.sync_gradients for t in self.trainers):
            return batch
        return {hook: distributed.all_gather_rows(rows) for hook, rows in batch.items()}

    # -- checkpoints ----------------------------------------------------------------------------

    def _state(self, tokens_seen: int) -> dict[str, Any]:
        return {
            "fingerprint": self.config.resume_fingerprint(),
            "step": self.step,
            "tokens_seen": tokens_seen,
            "trainers": [trainer.state_dict() for trainer in self.trainers],
            "store": self.store.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            **({"kl": self.kl_objective.state_dict()} if self.kl_objective is not None else {}),
        }

    def _restore(self) -> int:
        state = load_checkpoint(checkpoint_path(self.config.out, self.rank), self.config)
        if len(state["trainers"]) != len(self.trainers):
            raise ValueError(
                f"--resume: the checkpoint holds {len(state['trainers'])} dictionaries on this rank, this run has "
                f"{len(self.trainers)}; resume with the same hooks and number of ranks."
            )
        for trainer, trainer_state in zip(self.trainers, state["trainers"], strict=False):
            trainer.load_state_dict(trainer_state)
        self.store.load_state_dict(state["store"])
        if self.kl_objective is not None:
            self.kl_objective.load_state_dict(state["kl"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        return int(state["tokens_seen"])

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to ``config.n_steps``; returns ``{"dictionaries": [...], "metrics": {...}}``."""
        config = self.config
        tokens_seen = 0
        first_batch = None
        if config.resume:
            tokens_seen = self._restore()
        else:
            first_batch = self.store.next_batch()
            global_first = self._global(first_batch)
            for trainer in self.trainers:
                hook_in, hook_out = trainer.dict_cfg.hook_in, trainer.dict_cfg.hook_out
                trainer.initialise(global_first[hook_in], global_first[hook_out])
        logger = MetricLogger(config.n_steps, self.step, config.progress and self.rank == 0,
                              config.wandb and self.rank == 0, config.wandb_project, config.to_dict(), config.out)
        train_seconds, session_tokens = 0.0, 0
        try:
            while self.step < config.n_steps:
                started = time.perf_counter()
                batch = first_batch if first_batch is not None else self.store.next_batch()
                first_batch = None
                batch = self._local(batch)
                if self.kl_objective is not None:
                    self.kl_objective.prepare(self.trainers, self.step)
                for trainer in self.trainers:
                    dict_cfg = trainer.dict_cfg
                    trainer.train_step(batch[dict_cfg.hook_in], batch[dict_cfg.hook_out], self.step)
                if self.store.device.type == "cuda":
                    torch.cuda.synchronize(self.store.device)
                train_seconds += time.perf_counter() - started
                self.step += 1
                session_tokens += config.batch_size
                tokens_seen += config.batch_size
                logger.advance()
                logging = self.step % config.log_every == 0 or self.step == config.n_steps
                checkpointing = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0
                if logging or checkpointing:
                    # One host sync per interval; a NaN weight must be neither logged as a metric nor checkpointed.
                    self._check_finite()
                if logging:
                    record = self._log_record(tokens_seen, session_tokens / max(train_seconds, 1e-9))
                    self.history.append(record)
                    logger.log(self.step, record)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.n_steps:
                    evaluation = self._evaluate()
                    logger.log(self.step, {f"{name}/eval/{k}": v for name, m in evaluation.items() for k, v in m.items()})
                if checkpointing:
                    save_checkpoint(checkpoint_path(config.out, self.rank), self._state(tokens_seen))
        finally:
            logger.close()
        self._calibrate_batchtopk_thresholds()
        dictionaries = [trainer.module.export() for trainer in self.trainers]
        evaluation = self._evaluate(dictionaries)
        last = self.history[-1] if self.history else {}
        per_dictionary = {
            name: {**{k: last.get(f"{name}/{k}") for k in ("fvu", "l0", "dead_fraction", "dense_fraction", "mse")},
                   **evaluation.get(name, {})}
            for name in self.names
        }
        self._check_final(dictionaries, per_dictionary)
        return {
            "dictionaries": dictionaries,
            "per_dictionary": per_dictionary,
            "tokens_per_second": session_tokens / max(train_seconds, 1e-9),
            "steps": self.step,
            "tokens": tokens_seen,
            "history": self.history,
        }

    @torch.no_grad()
    def _calibrate_batchtopk_thresholds(self) -> None:
        """Set each BatchTopK dictionary's inference threshold from fresh batches and the final weights.

        The running estimate kept during training averages the smallest kept activation over the last
        ~1/(1-momentum) steps, while activations grow from their small initial scale: it trails the final
        weights and lets ~2k latents through per token after a short run. Fresh batches (after the training
        stream, so the training data and a resumed run see the same) fix that at the cost of a few forwards.
        """
        trainers = [t for t in self.trainers if t.config.architecture == "batchtopk"]
        n_batches = self.config.batchtopk_calibration_batches
        if not trainers or n_batches <= 0:
            return
        sums = [torch.zeros(2, device=t.device) for t in trainers]
        for _ in range(n_batches):
            batch = self._local(self.store.next_batch())
            for trainer, summed in zip(trainers, sums, strict=True):
                summed += trainer.batchtopk_threshold_sample(batch[trainer.dict_cfg.hook_in])
        for trainer, summed in zip(trainers, sums, strict=True):
            trainer.set_threshold(summed)

    def _diverged(self, name: str, what: str) -> TrainingDivergedError:
        trainer = self.trainers[self.names.index(name)] if name in self.names else None
        hooks = f" ({trainer.dict_cfg.hook_in} -> {trainer.dict_cfg.hook_out})" if trainer is not None else ""
        return TrainingDivergedError(
            f"Training diverged: dictionary {name!r}{hooks} {what} (lr={self.config.lr:g}). Nothing was saved for "
            f"this run in {self.config.out} (an earlier checkpoint there is unchanged); train again with a lower "
            f"learning rate, e.g. --lr {self.config.lr / 10:g}, or check the activations."
        )

    def _check_finite(self) -> None:
        for trainer, name in zip(self.trainers, self.names, strict=False):
            if not torch.isfinite(trainer.module.W_dec).all() or not torch.isfinite(trainer.module.W_enc_t).all():
                raise self._diverged(name, f"has non-finite weights at step {self.step}")

    def _check_final(self, dictionaries: list[Dictionary], per_dictionary: dict[str, dict[str, Any]]) -> None:
        """Refuse to return (and so to save) a dictionary with non-finite weights or metrics or an absurd FVU.

        Logging steps are checked during training; this checks what is actually saved, whatever the intervals.
        """
        problem: tuple[str, str] | None = None
        for dictionary, name in zip(dictionaries, self.names, strict=False):
            tensors = dict(dictionary.named_parameters()) | dict(dictionary.named_buffers())
            bad = [key for key, tensor in tensors.items() if tensor.numel() and not bool(torch.isfinite(tensor).all())]
            metrics = per_dictionary.get(name, {})
            nan_metrics = [key for key in _MUST_BE_FINITE
                           if isinstance(metrics.get(key), float) and not math.isfinite(metrics[key])]
            fvu = metrics.get("fvu")
            if bad:
                problem = (name, f"ended with non-finite weights ({', '.join(bad)})")
            elif nan_metrics:
                problem = (name, f"ended with non-finite metrics ({', '.join(nan_metrics)})")
            elif isinstance(fvu, float) and fvu > MAX_FINAL_FVU:
                problem = (name, f"ended at FVU {fvu:.3g}, above {MAX_FINAL_FVU:g} (predicting the mean scores 1)")
            if problem:
                break
        if distributed.world_size() > 1:  # every rank stops together, or the others wait for it forever
            flag = torch.tensor(float(problem is not None), device=self.trainers[0].device if self.trainers else "cpu")
            if float(distributed.sum_(flag)) > 0 and problem is None:
                problem = ("on another rank", "diverged")
        if problem is not None:
            raise self._diverged(*problem)

    def _log_record(self, tokens_seen: int, tokens_per_second: float) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "tokens": tokens_seen, "tokens_per_second": tokens_per_second}
        for trainer, name in zip(self.trainers, self.names, strict=False):
            for key, value in trainer.running_metrics().items():
                record[f"{name}/{key}"] = value
        if self.kl_objective is not None:
            record.update(self.kl_objective.running_metrics())
        return record

    def _evaluate(self, dictionaries: list[Dictionary] | None = None) -> dict[str, dict[str, float]]:
        if self.eval_fn is None:
            return {}
        if dictionaries is None:
            dictionaries = [trainer.module.export() for trainer in self.trainers]
        return dict(zip(self.names, self.eval_fn(dictionaries), strict=False))


def output_name(hook_in: str) -> str:
    """Sub-directory of a dictionary in the output directory."""
    return hook_in.replace("/", "_")


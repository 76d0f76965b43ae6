"""End-to-end KL fine-tuning: the KL term against plain transformer_lens hooks and torch's kl_div, its gradients
(dictionaries only, and equal to finite differences), short fine-tunes on stories260k that lower the spliced KL on
held-out text, resume, and bad settings."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import STORIES260K, TINYSTORIES

from featcircuits import load_dictionary
from featcircuits.cli import main as cli_main
from featcircuits.training import TrainConfig, run_training, write_cache
from featcircuits.training.api import _dictionary_config
from featcircuits.training.cross_layer import CrossLayerTrainer, cross_layer_dictionary_config
from featcircuits.training.dictionary_trainer import DictionaryTrainer
from featcircuits.training.kl_objective import SplicedKL, check_kl_config, evaluate_spliced_set
from featcircuits.training.sources import ModelSource
from featcircuits.training.tokens import special_token_ids, tokenize_text_file

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N_LAYERS, D = 5, 64
MLP_IN = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(N_LAYERS)]
MLP_OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]
RESID = [f"blocks.{layer}.hook_resid_mid" for layer in (1, 3)]


@pytest.fixture(scope="module")
def held_out(stories_model):
    return tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 48)


def _special(model) -> list[int]:
    return special_token_ids(model.tokenizer)


def _trainers(model, config: TrainConfig, tokens: torch.Tensor) -> list:
    """Trainers of ``config``'s dictionaries, initialised from ``model``'s activations on ``tokens`` and nudged
    off their data-dependent start (so every parameter matters)."""
    _, cache = model.run_with_cache(tokens)
    rows = {hook: cache[hook].reshape(-1, D) for hook in dict.fromkeys(config.hooks + config.hooks_out)}
    widths = dict.fromkeys(rows, D)
    if config.kind == "cross_layer_transcoder":
        trainer = CrossLayerTrainer(config, cross_layer_dictionary_config(config, widths, "stories260k"),
                                    torch.device("cpu"))
        trainer.initialise(torch.stack([rows[h] for h in config.hooks], 1),
                           torch.stack([rows[h] for h in config.hooks_out], 1))
        trainers = [trainer]
    else:
        trainers = []
        for hook_in, hook_out in config.pairs:
            trainer = DictionaryTrainer(config, _dictionary_config(config, hook_in, hook_out, widths, "stories260k"),
                                        torch.device("cpu"))
            trainer.initialise(rows[hook_in], rows[hook_out])
            trainers.append(trainer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for trainer in trainers:
            for name, parameter in trainer.module.named_parameters():
                if not name.startswith("log_threshold"):
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return trainers


def _config(kind: str, architecture: str = "topk", **overrides) -> TrainConfig:
    hooks, hooks_out = (RESID, []) if kind == "sae" else (MLP_IN, MLP_OUT)
    fields: dict[str, Any] = dict(hooks=hooks, hooks_out=hooks_out, kind=kind, architecture=architecture, k=8, d_sae=128,
                  dataset="text", model="stories260k", total_tokens=4096, batch_size=1024, kl_coefficient=2.0,
                  kl_fraction=1.0, kl_sequences=4, context_size=48, device="cpu", jumprelu_init_threshold=0.05)
    fields.update(overrides)
    return TrainConfig(**fields)


def _reference_kl(model, trainers, tokens, special_ids, exported=None) -> torch.Tensor:
    """The exported dictionaries spliced in with plain run_with_hooks, all at once; KL by F.kl_div (differentiable
    in the exported dictionaries' parameters)."""
    keep = ~torch.isin(tokens, torch.tensor(special_ids))
    exported = exported or [trainer.module.export() for trainer in trainers]
    seen: dict[str, torch.Tensor] = {}

    def read(acts, hook):
        seen[hook.name] = acts.clone()

    def write(acts, hook, dictionary, hook_in):
        x_in = acts if hook_in == hook.name else seen[hook_in]
        acts = acts.clone()
        acts[keep] = dictionary(x_in[keep])[0]
        return acts

    hooks = []
    if trainers[0].dict_cfg.kind == "cross_layer_transcoder":
        clt = exported[0]
        codes: list[torch.Tensor] = []

        def encode(acts, hook, layer):
            codes.append(clt.encode_layer(acts[keep], layer))

        def decode(acts, hook, layer):
            acts = acts.clone()
            acts[keep] = clt.decode_layer(torch.stack(codes[: layer + 1], -2), layer)
            return acts

        for layer in range(N_LAYERS):
            hooks += [(MLP_IN[layer], lambda a, hook, layer=layer: encode(a, hook, layer)),
                      (MLP_OUT[layer], lambda a, hook, layer=layer: decode(a, hook, layer))]
    else:
        for dictionary in exported:
            hook_in, hook_out = dictionary.cfg.hook_in, dictionary.cfg.hook_out
            if hook_in != hook_out:
                hooks.append((hook_in, read))
            hooks.append((hook_out, lambda a, hook, d=dictionary, h=hook_in: write(a, hook, d, h)))
    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)
    spliced = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)
    per_position = F.kl_div(spliced, clean, log_target=True, reduction="none").sum(-1)
    return per_position[keep].mean()


@pytest.mark.parametrize("kind, architecture", [("transcoder", "topk"), ("skip_transcoder", "jumprelu"),
                                                ("transcoder", "relu"), ("sae", "topk"),
                                                ("cross_layer_transcoder", "topk"),
                                                ("cross_layer_transcoder", "jumprelu")])
def test_kl_term_equals_plain_hooks_and_kl_div(stories_model, held_out, kind, architecture):
    config = _config(kind, architecture)
    tokens = held_out[:4]
    trainers = _trainers(stories_model, config, held_out[4:12])
    objective = SplicedKL(config, stories_model, None, _special(stories_model))
    with torch.no_grad():
        ours = float(objective.loss(trainers, tokens))
        reference = float(_reference_kl(stories_model, trainers, tokens, _special(stories_model)))
    assert reference > 1e-3  # the splice changes the model's predictions: a real comparison
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-6)
    exported = [trainer.module.export() for trainer in trainers]
    assert evaluate_spliced_set(stories_model, exported, tokens, _special(stories_model))["kl"] == pytest.approx(
        reference, rel=1e-4, abs=1e-6)


class _Rows:
    """A fixed token stream standing in for the training text."""

    def __init__(self, tokens):
        self.tokens, self.rows_done = tokens, 0

    def next_rows(self, n):
        rows = self.tokens[self.rows_done : self.rows_done + n]
        self.rows_done += len(rows)
        return rows


@pytest.mark.parametrize("kind", ["skip_transcoder", "cross_layer_transcoder"])
def test_gradients_reach_only_the_dictionaries_and_match_finite_differences(stories_model, held_out, kind):
    config = _config(kind, "topk")
    trainers = _trainers(stories_model, config, held_out[4:12])
    objective = SplicedKL(config, stories_model, _Rows(held_out[:4]), _special(stories_model))
    objective.prepare(trainers, step=0)
    assert all(p.grad is None for p in stories_model.parameters())
    assert all(p.requires_grad for p in stories_model.parameters())  # frozen only inside the KL forward
    for trainer in trainers:
        grads = dict(zip([n for n, _ in trainer.module.named_parameters()], trainer.extra_gradients, strict=True))
        for name, grad in grads.items():
            assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0, name

    # The gradient equals autograd's through the plain-hooks reference (exported weights, transformer_lens' own
    # attention): for b_dec, whose exported value is b_dec / target_scale, up to that factor. The first
    # dictionary's reaches the KL through the rest of the model and the later dictionaries' inputs.
    module = trainers[0].module
    names = [n for n, _ in module.named_parameters()]
    ours = trainers[0].extra_gradients[names.index("b_dec")] / config.kl_coefficient
    exported = [trainer.module.export() for trainer in trainers]
    reference = _reference_kl(stories_model, trainers, held_out[:4], _special(stories_model), exported)
    (reference_grad,) = torch.autograd.grad(reference, [exported[0].b_dec])
    target_scale = torch.tensor(module.target_scale, dtype=torch.float32).reshape(-1, 1)
    assert torch.allclose(ours, reference_grad / target_scale, rtol=1e-3, atol=1e-6)
    stories_model.zero_grad(set_to_none=True)

    # And central differences, along a direction of the last layer's b_dec (no dictionary after it whose TopK
    # selection could flip within the step).
    last = trainers[-1].module
    grad = (trainers[-1].extra_gradients[names.index("b_dec")] / config.kl_coefficient).reshape(-1, D)[-1]
    direction = torch.randn(D, generator=torch.Generator().manual_seed(2))
    step = 1e-2
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            last.b_dec.view(-1, D)[-1] += sign * step * direction
            values.append(float(objective.loss(trainers, held_out[:4])))
            last.b_dec.view(-1, D)[-1] -= sign * step * direction
    numeric = (values[0] - values[1]) / (2 * step)
    assert numeric == pytest.approx(float((grad * direction).sum()), rel=0.01)

    # The trainer adds the KL gradient to its reconstruction gradient (before its optimiser step).
    trainer = trainers[0]
    twin = copy.deepcopy(trainer)
    extra = [g.clone() for g in trainer.extra_gradients]
    twin.extra_gradients = None
    shape = (64, N_LAYERS, D) if kind == "cross_layer_transcoder" else (64, D)
    x_in, target = torch.randn(shape), torch.randn(shape)
    trainer.train_step(x_in, target, 0)
    twin.train_step(x_in, target, 0)
    for name, mine, theirs, added in zip(names, trainer.module.parameters(), twin.module.parameters(), extra,
                                         strict=True):
        if name in ("b_enc", "b_dec"):  # no unit-norm projection on these
            assert torch.allclose(mine.grad - theirs.grad, added, atol=1e-5), name
    assert trainer.extra_gradients is None  # used for one step only


def _fine_tune(tmp_path, name: str, coefficient: float, **overrides) -> dict:
    fields: dict[str, Any] = dict(model=str(STORIES260K), dataset=str(TINYSTORIES / "train_head.txt"), out=str(tmp_path / name),
                  hooks=MLP_IN, hooks_out=MLP_OUT, kind="transcoder", architecture="topk", k=8, d_sae=128,
                  total_tokens=512 * 24, batch_size=512, lr=3e-3, lr_warmup_steps=2, context_size=48,
                  model_batch_size=16, buffer_bytes=2**23, shuffle_buffer_tokens=2**14, eval_sequences=4,
                  log_every=4, device="cpu", progress=False, kl_coefficient=coefficient, kl_fraction=0.5,
                  kl_sequences=8)
    fields.update(overrides)
    return run_training(TrainConfig(**fields))


@pytest.mark.parametrize("kind", ["transcoder", "cross_layer_transcoder"])
def test_a_short_kl_fine_tune_lowers_the_spliced_kl_on_held_out_text(stories_model, held_out, tmp_path, kind):
    special = _special(stories_model)
    tokens = held_out[:32]
    plain = _fine_tune(tmp_path, "plain", 0.0, kind=kind, total_tokens=512 * 16)
    tuned = _fine_tune(tmp_path, "tuned", 30.0, kind=kind, total_tokens=512 * 16)
    before = evaluate_spliced_set(stories_model, plain["dictionaries"], tokens, special)
    after = evaluate_spliced_set(stories_model, tuned["dictionaries"], tokens, special)
    assert after["kl"] < 0.85 * before["kl"], (before, after)
    assert after["ce_loss_recovered"] > before["ce_loss_recovered"], (before, after)
    # The training KL is logged per interval from the KL phase (steps 8..15) on, and not before.
    logged = [(record["step"], record.get("train_kl")) for record in tuned["history"]]
    assert [step for step, kl in logged if kl is not None] == [12, 16], logged
    assert all("train_kl" not in record for record in plain["history"])


def test_resume_inside_the_kl_phase_matches_the_uninterrupted_run(tmp_path):
    """A run checkpointed at step 10 (inside the KL phase, steps 6..15) and resumed from there ends with the
    weights of the same run done in one go: the KL rows, gradients and schedule all continue."""
    settings = dict(kind="skip_transcoder", hooks=MLP_IN[1:3], hooks_out=MLP_OUT[1:3], total_tokens=512 * 16,
                    kl_fraction=0.6, checkpoint_every=10)
    whole = _fine_tune(tmp_path, "run", 30.0, **settings)["dictionaries"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint" / "rank0.pt", weights_only=True)
    assert checkpoint["step"] == 10 and "kl" in checkpoint
    resumed = _fine_tune(tmp_path, "run", 30.0, resume=True, **settings)["dictionaries"]
    for first, second in zip(whole, resumed, strict=True):
        for name in ("W_enc", "W_dec", "b_dec", "W_skip"):
            assert torch.allclose(getattr(first, name), getattr(second, name), atol=1e-6), name
    # Changing the KL settings is a different run: refused on resume.
    with pytest.raises(ValueError, match="different configuration.*kl_coefficient"):
        _fine_tune(tmp_path, "run", 10.0, resume=True, **settings)


@pytest.mark.slow
def test_two_gloo_ranks_with_the_kl_term_match_one_process(tmp_path):
    """Each rank runs half of every step's KL rows; the averaged gradients are the whole set's, so two ranks
    train the weights one process does (up to float summation order)."""
    fields: dict[str, Any] = dict(
        model=str(STORIES260K), dataset=str(TINYSTORIES / "train_head.txt"), hooks=MLP_IN[1:3],
        hooks_out=MLP_OUT[1:3], kind="transcoder", architecture="topk", k=8, d_sae=96, total_tokens=512 * 8,
        batch_size=512, lr=1e-3, context_size=48, model_batch_size=16, buffer_bytes=2**23,
        shuffle_buffer_tokens=2**14, eval_sequences=4, device="cpu", progress=False, log_every=4,
        lr_decay_fraction=0.0, kl_coefficient=30.0, kl_fraction=0.5, kl_sequences=8)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**fields, "out": str(tmp_path / "two")}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "featcircuits.cli", "train",
               str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_training(TrainConfig(**fields, out=str(tmp_path / "one")))
    for hook in MLP_IN[1:3]:
        one, two = load_dictionary(tmp_path / "one" / hook), load_dictionary(tmp_path / "two" / hook)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert (getattr(one, name) - getattr(two, name)).abs().max().item() < 1e-4, (hook, name)
    history = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert [record["step"] for record in history if "train_kl" in record] == [8]


def _kl_and_gradients_on(device: torch.device, model, trainers, config, tokens) -> tuple[float, list[torch.Tensor]]:
    """The KL term and its gradients with ``model`` and copies of ``trainers``' dictionaries on ``device``."""
    moved = [SimpleNamespace(module=copy.deepcopy(t.module).to(device), extra_gradients=None) for t in trainers]
    objective = SplicedKL(config, copy.deepcopy(model).to(device), _Rows(tokens), _special(model))
    objective.prepare(moved, step=0)
    kl = objective.running_metrics()["train_kl"]
    return kl, [g.cpu() for t in moved for g in t.extra_gradients]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("kind", ["transcoder", "cross_layer_transcoder"])
def test_the_kl_term_and_its_gradients_on_cuda_match_the_cpu(stories_model, held_out, kind):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare real fp32
    try:
        config = _config(kind)
        trainers = _trainers(stories_model, config, held_out[4:12])
        cpu_kl, cpu_grads = _kl_and_gradients_on(torch.device("cpu"), stories_model, trainers, config, held_out[:4])
        gpu_kl, gpu_grads = _kl_and_gradients_on(torch.device("cuda"), stories_model, trainers, config, held_out[:4])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert gpu_kl == pytest.approx(cpu_kl, rel=1e-4)
    for cpu_grad, gpu_grad in zip(cpu_grads, gpu_grads, strict=True):
        assert torch.allclose(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-6 * float(cpu_grad.abs().max()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, words", [("kl_coefficient", -1.0, "kl_coefficient=-1.0 must be a finite"),
                                                 ("kl_coefficient", float("nan"), "kl_coefficient=nan"),
                                                 ("kl_fraction", 0.0, r"kl_fraction=0.0 must lie in \(0, 1\]"),
                                                 ("kl_fraction", 1.5, "kl_fraction=1.5"),
                                                 ("kl_sequences", -2, "kl_sequences must be zero or positive")])
def test_bad_kl_settings_are_refused(field, value, words):
    with pytest.raises(ValueError, match=words):
        _config("transcoder", **{field: value}).validate()


def test_cli_refuses_a_negative_coefficient_in_one_line(tmp_path, capsys):
    code = cli_main(["train", "--model", str(STORIES260K), "--hook", MLP_IN[0], "--hook-out", MLP_OUT[0],
                     "--dataset", str(TINYSTORIES / "train_head.txt"), "--out", str(tmp_path / "run"),
                     "--kl-coefficient", "-3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "kl_coefficient=-3.0 must be a finite number >= 0" in err
    assert not (tmp_path / "run").exists()


def test_a_cached_activation_dataset_is_refused_before_the_model_loads(stories_model, tmp_path):
    tokens = tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 32)[:8]
    source = ModelSource(stories_model, tokens, [MLP_IN[1], MLP_OUT[1]], 8, _special(stories_model), shuffle=False)
    write_cache(source, tmp_path / "cache", [MLP_IN[1], MLP_OUT[1]], source.widths(), len(tokens))
    config = TrainConfig(hooks=[MLP_IN[1]], hooks_out=[MLP_OUT[1]], dataset=str(tmp_path / "cache"),
                         model=str(tmp_path / "no_such_model"), out=str(tmp_path / "run"), total_tokens=1024,
                         batch_size=128, kl_coefficient=5.0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs token rows run through the model.*activation cache"):
        run_training(config)  # the model path does not exist: the refusal comes first
    assert not (tmp_path / "run").exists()


def test_settings_the_spliced_forward_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r"several write \['blocks.1.hook_resid_mid'\]"):
        check_kl_config(_config("sae", hooks=[RESID[0], RESID[0]]), cached=False)
    with pytest.raises(ValueError, match="drop distribute_dictionaries"):
        check_kl_config(_config("transcoder", distribute_dictionaries=True), cached=False, world=2)
    with pytest.raises(ValueError, match="kl_sequences=3 must be divisible by the 2 ranks"):
        check_kl_config(_config("transcoder", kl_sequences=3), cached=False, world=2)
    check_kl_config(_config("transcoder", kl_sequences=0), cached=False, world=3)  # the default rounds up
    check_kl_config(_config("transcoder", kl_coefficient=0.0, distribute_dictionaries=True), cached=True, world=2)


def test_config_keys_round_trip_and_old_checkpoints_still_resume(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_config("transcoder").to_dict(), "kl_coefficient": "20", "kl_fraction": 0.05}))
    from featcircuits.training import load_train_config

    loaded = load_train_config(path, ["kl_sequences=12"])
    assert (loaded.kl_coefficient, loaded.kl_fraction, loaded.kl_sequences) == (20.0, 0.05, 12)
    # With the term off its fields are not part of the resume fingerprint (checkpoints from before them match).
    off = _config("transcoder", kl_coefficient=0.0)
    assert "kl_fraction" not in off.resume_fingerprint() and "kl_fraction" in loaded.resume_fingerprint()

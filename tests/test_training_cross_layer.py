"""Training cross-layer transcoders: ground truth with cross-layer structure, the export, resume, a real model run
with per-layer metrics, and bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES260K, TINYSTORIES

import featcircuits as fc
from featcircuits.dictionaries import CrossLayerTranscoder
from featcircuits.training import ActivationStore, TrainConfig, run_training
from featcircuits.training.cross_layer import (
    CROSS_LAYER_NAME,
    CrossLayerTrainer,
    cross_layer_dictionary_config,
    train_cross_layer,
)
from featcircuits.training.cross_layer_module import cross_layer_loss

N_LAYERS, D, N_FEATURES = 3, 16, 24
HOOKS_IN = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(N_LAYERS)]
HOOKS_OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]


class CrossLayerData:
    """Sparse features at each layer's input (directions ``inputs[L]``) whose effects reach every later MLP output
    (directions ``effects[L][M]``): MLP output M = sum_{L<=M} coefficients_L @ effects[L][M]. A per-layer transcoder
    at M sees only layer M's features; a CLT can represent the whole map exactly with N_FEATURES latents per layer."""

    def __init__(self, seed: int = 0, rows: int = 2048) -> None:
        generator = torch.Generator().manual_seed(seed)

        def unit(*shape: int) -> torch.Tensor:
            vectors = torch.randn(*shape, generator=generator)
            return vectors / vectors.norm(dim=-1, keepdim=True)

        self.inputs = unit(N_LAYERS, N_FEATURES, D)
        self.effects = unit(N_LAYERS, N_LAYERS, N_FEATURES, D)
        self.rows = rows
        self.generator = torch.Generator().manual_seed(seed + 1)

    def widths(self) -> dict[str, int]:
        return dict.fromkeys(HOOKS_IN + HOOKS_OUT, D)

    def next_chunk(self) -> dict[str, torch.Tensor]:
        active = torch.rand(self.rows, N_LAYERS, N_FEATURES, generator=self.generator) < 0.06
        coefficients = active * (0.5 + torch.rand(self.rows, N_LAYERS, N_FEATURES, generator=self.generator))
        chunk = {HOOKS_IN[layer]: coefficients[:, layer] @ self.inputs[layer] for layer in range(N_LAYERS)}
        for out in range(N_LAYERS):
            chunk[HOOKS_OUT[out]] = sum(coefficients[:, layer] @ self.effects[layer, out] for layer in range(out + 1))
        return chunk

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _config(out, **overrides) -> TrainConfig:
    fields = dict(hooks=HOOKS_IN, hooks_out=HOOKS_OUT, kind="cross_layer_transcoder", dataset="synthetic",
                  out=str(out), architecture="topk", k=4, d_sae=N_FEATURES * 2, total_tokens=512 * 150,
                  batch_size=512, lr=3e-3, buffer_bytes=2**22, log_every=50, device="cpu", progress=False,
                  dead_after_tokens=20_000, lr_decay_fraction=0.3)
    fields.update(overrides)
    return TrainConfig(**fields)


def _train(config: TrainConfig, store_class=ActivationStore) -> dict:
    torch.manual_seed(config.seed)  # as featcircuits.train does before building the dictionaries
    source = CrossLayerData()
    store = store_class(source, source.widths(), config.batch_size, config.buffer_bytes, device=torch.device("cpu"),
                        seed=config.seed, max_rows=config.batch_size * config.n_steps)
    return train_cross_layer(config, store, source.widths(), "synthetic", torch.device("cpu"), False, None)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "relu"])
def test_learns_cross_layer_ground_truth(tmp_path, single_torch_thread, architecture):
    overrides = {"relu": dict(l1_coefficient=0.3), "jumprelu": dict(l0_coefficient=0.05)}
    result = _train(_config(tmp_path, architecture=architecture, **overrides.get(architecture, {})))
    (clt,) = result["dictionaries"]
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == N_LAYERS
    last = result["history"][-1]
    fvu_by_layer = [last[f"{CROSS_LAYER_NAME}/fvu_layer{m}"] for m in range(N_LAYERS)]
    # Output M is M/(M+1) earlier layers' features: a dictionary reading layer M's input alone cannot have an FVU
    # below M/(M+1) there (1/2, 2/3). Reaching well below that needs the writes across layers.
    assert fvu_by_layer[0] < 0.3, fvu_by_layer
    assert all(fvu_by_layer[m] < 0.5 * m / (m + 1) for m in (1, 2)), fvu_by_layer
    # held-out rows through the exported CLT (raw units) agree
    chunk = CrossLayerData(seed=0, rows=1024)
    chunk.generator.manual_seed(123)
    rows = chunk.next_chunk()
    x = torch.stack([rows[h] for h in HOOKS_IN], 1)
    target = torch.stack([rows[h] for h in HOOKS_OUT], 1)
    with torch.no_grad():
        reconstruction = clt(x)[0]
    fvu = (reconstruction - target).pow(2).sum((0, 2)) / (target - target.mean(0)).pow(2).sum((0, 2))
    assert float(fvu.max()) < 0.3, fvu


def test_export_reads_and_writes_raw_activations(single_torch_thread):
    config = _config("unused", architecture="jumprelu", l0_coefficient=0.01)
    source = CrossLayerData()
    cfg = cross_layer_dictionary_config(config, source.widths(), "synthetic")
    trainer = CrossLayerTrainer(config, cfg, torch.device("cpu"))
    rows = source.next_chunk()
    x = torch.stack([rows[h] for h in HOOKS_IN], 1) * torch.tensor([1.0, 3.0, 0.2])[:, None]  # unequal scales
    target = torch.stack([rows[h] for h in HOOKS_OUT], 1) * torch.tensor([0.5, 2.0, 7.0])[:, None]
    trainer.initialise(x, target)
    for step in range(5):
        trainer.train_step(x, target, step)
    assert len(set(trainer.module.norm_scale)) == N_LAYERS  # one scale per layer
    in_scale, out_scale = trainer.module.scales(x.device)
    with torch.no_grad():
        step_out = cross_layer_loss(trainer.module, x * in_scale, target * out_scale, "jumprelu", 0, 0.0, 0.05,
                                    None, 1, 0.0)
        exported = trainer.module.export()(x)[0]
    torch.testing.assert_close(exported, step_out.reconstruction / out_scale, atol=1e-5, rtol=1e-5)


class _Interrupted(ActivationStore):
    """Fails on the 18th batch, i.e. after the checkpoint at step 10 (the run's own crash, not a test stub)."""

    calls = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        type(self).calls += 1
        if type(self).calls == 18:
            raise KeyboardInterrupt
        return super().next_batch()


def test_resume_continues_the_interrupted_run(tmp_path, single_torch_thread):
    fields = dict(total_tokens=512 * 30, checkpoint_every=10, log_every=10, architecture="batchtopk")
    straight = _train(_config(tmp_path / "straight", **fields))["dictionaries"][0]
    _Interrupted.calls = 0
    with pytest.raises(KeyboardInterrupt):
        _train(_config(tmp_path / "resumed", **fields), store_class=_Interrupted)
    assert (tmp_path / "resumed" / "checkpoint").is_dir()
    resumed = _train(_config(tmp_path / "resumed", resume=True, **fields))["dictionaries"][0]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.slow
def test_stories260k_run_writes_a_clt_with_metrics_per_layer(tmp_path, single_torch_thread):
    n = 5
    config = TrainConfig(
        model=str(STORIES260K), dataset=str(TINYSTORIES / "valid_head.txt"), kind="cross_layer_transcoder",
        hooks=[f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)],
        hooks_out=[f"blocks.{layer}.hook_mlp_out" for layer in range(n)], architecture="topk", k=8, d_sae=64,
        total_tokens=256 * 40, batch_size=256, lr=1e-3, context_size=64, model_batch_size=16, eval_sequences=4,
        out=str(tmp_path / "run"), progress=False, log_every=20, buffer_bytes=2**22, device="cpu")
    result = run_training(config)
    metrics = result["per_dictionary"][CROSS_LAYER_NAME]
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(8, abs=0.01)  # (a rare token has < k > 0)
    assert all(f"eval_fvu_layer{m}" in metrics for m in range(n)) and metrics["ce_spliced"] < metrics["ce_zero_ablation"]
    (clt,) = fc.load_dictionaries(str(tmp_path / "run" / CROSS_LAYER_NAME))
    assert isinstance(clt, CrossLayerTranscoder) and clt.hooks_out[4] == "blocks.4.hook_mlp_out"
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_bad_settings_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="hooks must be blocks.0.<hook>, blocks.1.<hook>"):
        run_training(_config(tmp_path / "a", hooks=HOOKS_IN[1:] + HOOKS_IN[:1]))
    with pytest.raises(ValueError, match=r"does not take \['distribute_dictionaries'\]"):
        run_training(_config(tmp_path / "b", distribute_dictionaries=True))
    # a CLT must span the model: 3 layers named for stories260k's 5
    config = _config(tmp_path / "c", model=str(STORIES260K), dataset=str(TINYSTORIES / "valid_head.txt"))
    with pytest.raises(ValueError, match="hooks name 3 layers but the model has 5"):
        run_training(config)
    assert not (tmp_path / "c" / CROSS_LAYER_NAME).exists()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(stories_model, tmp_path):
    """Data parallel: 2 torchrun ranks each training on half of every global batch (gradients averaged) end with
    the one-process weights, from an activation cache of all ten hooks. (TopK: a token's latents do not depend on
    the rest of its batch; BatchTopK selects within each rank's half, as for per-layer dictionaries.)"""
    from test_training_distributed import _torchrun

    from featcircuits.training import write_cache
    from featcircuits.training.sources import ModelSource
    from featcircuits.training.tokens import special_token_ids, tokenize_text_file

    n = stories_model.cfg.n_layers
    hooks_in = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)]
    hooks_out = [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]
    tokens = tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 64)[:24]
    source = ModelSource(stories_model, tokens, hooks_in + hooks_out, 12, special_token_ids(stories_model.tokenizer),
                         shuffle=False)
    write_cache(source, tmp_path / "cache", hooks_in + hooks_out, source.widths(), len(tokens), rows_per_shard=1000,
                metadata={"model_name": stories_model.cfg.model_name})
    fields = dict(hooks=hooks_in, hooks_out=hooks_out, kind="cross_layer_transcoder", dataset=str(tmp_path / "cache"),
                  architecture="topk", k=4, d_sae=48, total_tokens=256 * 6, batch_size=256, lr=1e-3,
                  buffer_bytes=2**21, device="cpu", progress=False, log_every=3, lr_decay_fraction=0.0)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**fields, "out": str(tmp_path / "two")}))
    completed = _torchrun(config_path, 2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_training(TrainConfig(**fields, out=str(tmp_path / "one")))
    one = fc.load_dictionaries(str(tmp_path / "one" / CROSS_LAYER_NAME))[0]
    two = fc.load_dictionaries(str(tmp_path / "two" / CROSS_LAYER_NAME))[0]
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        # averaging two half-batch gradients reorders float sums; a different row would move weights by ~lr
        assert float((a - b).abs().max()) < 1e-4, name
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and f"{CROSS_LAYER_NAME}/fvu_layer4" in metrics["history"][-1]

"""Ground truth: dictionaries trained on synthetic superposition recover the true feature directions."""

from __future__ import annotations

import pytest
import torch

from featcircuits.dictionaries import DictionaryConfig
from featcircuits.training import (
    ActivationStore,
    DictionaryTrainer,
    SuperpositionData,
    SyntheticSource,
    TrainConfig,
    Trainer,
    max_cosine_similarity,
)


@pytest.fixture
def one_thread():
    # Tiny matrices: one thread avoids OpenMP hand-off costs on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_on_synthetic(data: SuperpositionData, kind: str, architecture: str, tokens: int, lr: float, batch_size: int = 512,
                       **overrides) -> tuple:
    hook_out = "y" if data.d_out else "x"
    source = SyntheticSource(data, "x", hook_out, rows=2048)
    config = TrainConfig(
        hooks=["x"], hooks_out=[hook_out] if data.d_out else [], kind=kind, dataset="synthetic",
        architecture=architecture, k=4, total_tokens=tokens, batch_size=batch_size, lr=lr,
        progress=False, log_every=50, **{"lr_decay_fraction": 0.3, "dead_after_tokens": 20_000, "d_sae": 2 * data.n_features, **overrides},
    )
    store = ActivationStore(source, source.widths(), batch_size, 64 * 4096 * 4, seed=0)
    dict_cfg = DictionaryConfig(
        d_in=data.d, d_out=data.d_out or data.d, d_sae=config.d_sae, kind=kind, activation=architecture,
        k=4 if architecture in ("topk", "batchtopk") else None, hook_in="x", hook_out=hook_out,
        apply_b_dec_to_input=kind == "sae",
    )
    trainer = DictionaryTrainer(config, dict_cfg, torch.device("cpu"))
    result = Trainer(config, [trainer], ["x"], store).run()
    return result["dictionaries"][0], result


def test_topk_sae_recovers_true_directions(one_thread):
    data = SuperpositionData(n_features=64, d=32, p_active=0.03, seed=0)
    dictionary, result = train_on_synthetic(data, "sae", "topk", tokens=100_000, lr=1e-2)
    recovered = max_cosine_similarity(data.directions, dictionary.W_dec)
    assert recovered.mean() >= 0.99, recovered
    # The saved (inference) dictionary reconstructs fresh data well: an independent check of the weights.
    x, _ = data.sample(2048)
    reconstruction, feature_acts = dictionary(x)
    fvu = (reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.15
    assert (feature_acts > 0).sum(-1).float().mean() <= 4


def test_topk_transcoder_recovers_mapped_directions(one_thread):
    data = SuperpositionData(n_features=64, d=32, p_active=0.03, d_out=32, seed=0)
    dictionary, _ = train_on_synthetic(data, "transcoder", "topk", tokens=100_000, lr=1e-2)
    recovered = max_cosine_similarity(data.output_directions, dictionary.W_dec)
    assert recovered.mean() >= 0.99, recovered
    # A random map was learned, not the identity: the true input directions are not the decoder's.
    assert max_cosine_similarity(data.directions, dictionary.W_dec).mean() < 0.9


@pytest.mark.parametrize(
    "architecture, kind, extra",
    [
        ("relu", "sae", {"l1_coefficient": 2.0}),
        ("batchtopk", "sae", {}),
        ("jumprelu", "sae", {"l0_coefficient": 0.3, "jumprelu_init_threshold": 0.5}),
        ("topk", "skip_transcoder", {}),
    ],
)
def test_every_architecture_learns_sparse_codes(one_thread, architecture, kind, extra):
    data = SuperpositionData(n_features=64, d=32, p_active=0.03, d_out=32 if kind != "sae" else None, seed=0)
    dictionary, result = train_on_synthetic(data, kind, architecture, tokens=40_000, lr=1e-2, **extra)
    x, target = data.sample(2048)
    with torch.no_grad():
        reconstruction, feature_acts = dictionary(x)
    fvu = ((reconstruction - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()).item()
    l0 = (feature_acts > 0).sum(-1).float().mean().item()
    # Far better than the best constant (FVU 1) with far fewer active latents than there are (128).
    assert fvu < 0.35, fvu
    assert 0 < l0 < 20, l0
    if architecture == "batchtopk":
        # Inference uses the calibrated global threshold: L0 near k=4 without seeing the batch.
        assert dictionary.threshold.item() > 0 and 3 <= l0 <= 5
    if kind == "skip_transcoder":
        assert dictionary.W_skip.abs().sum() > 0


def _fvu(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    return ((reconstruction - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()).item()


def test_batchtopk_inference_threshold_keeps_k_per_token(one_thread):
    """The saved BatchTopK dictionary's threshold (a JumpReLU for inference) keeps ~k latents per token on
    held-out data and reconstructs it as well as the batch selection it replaces. A short run is the hard
    case: activations grow from their small initial scale, so an average of thresholds seen during training
    trails the final weights (it gave L0 ~2k here)."""
    torch.manual_seed(0)
    k, batch_size = 4, 512
    data = SuperpositionData(n_features=64, d=32, p_active=0.03, seed=0)
    dictionary, _ = train_on_synthetic(data, "sae", "batchtopk", tokens=40_000, lr=1e-2, batch_size=batch_size)
    x, _ = data.sample(8 * batch_size)  # drawn after training and calibration: never seen
    with torch.no_grad():
        reconstruction, feature_acts = dictionary(x)  # eval mode: acts > threshold, token by token
        inference_l0 = (feature_acts > 0).sum(-1).float().mean().item()
        inference_fvu = _fvu(reconstruction, x)
        dictionary.train()  # the training-mode selection: top k * batch over each batch of the training size
        batch_reconstruction = torch.cat([dictionary(chunk)[0] for chunk in x.split(batch_size)])
        dictionary.eval()
        batch_fvu = _fvu(batch_reconstruction, x)
    assert abs(inference_l0 - k) <= 0.25 * k, inference_l0
    assert abs(inference_fvu - batch_fvu) <= 0.15 * batch_fvu, (inference_fvu, batch_fvu)

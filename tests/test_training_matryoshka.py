"""Matryoshka training (``matryoshka_prefixes``): the loss it defines, and the absorption it prevents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from featcircuits.dictionaries import DictionaryConfig
from featcircuits.training import ActivationStore, DictionaryTrainer, TrainConfig, Trainer
from featcircuits.training.objectives import batchtopk_loss, relu_loss, topk_loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@dataclass
class ParentChildData:
    """Rows ``x [rows, d]`` built from orthonormal directions: a parent is active on 25% of rows, and on 80%
    of those one of its three children is active with it. An L1 SAE absorbs such a parent into its children's
    latents (each child latent decodes parent + child), so the parent's own latent fires only on the 20% of
    the parent's rows that have no child: feature absorption (Chanin et al. 2024)."""

    d: int = 16
    parents: int = 2
    children: int = 3
    seed: int = 0
    d_out: int | None = None

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        basis, _ = torch.linalg.qr(torch.randn(self.d, self.d, generator=generator))
        self.parent_directions = basis[: self.parents]  # [parents, d]
        self.child_directions = basis[self.parents: self.parents * (1 + self.children)]  # [parents * children, d]
        self.generator = torch.Generator().manual_seed(self.seed + 1)

    def coefficients(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        parent_on = torch.rand(rows, self.parents, generator=self.generator) < 0.25  # [rows, parents]
        pick = torch.randint(self.children, (rows, self.parents), generator=self.generator)
        with_child = parent_on & (torch.rand(rows, self.parents, generator=self.generator) < 0.8)
        child_on = torch.nn.functional.one_hot(pick, self.children).bool() & with_child[..., None]
        return parent_on.float(), child_on.reshape(rows, -1).float()

    def sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        parent_on, child_on = self.coefficients(rows)
        x = parent_on @ self.parent_directions + child_on @ self.child_directions
        return x, x

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _train(prefixes: list[int], seed: int = 0):
    from featcircuits.training import SyntheticSource

    data = ParentChildData(seed=seed)
    source = SyntheticSource(data, "x", "x", rows=2048)
    config = TrainConfig(hooks=["x"], dataset="synthetic", architecture="relu", l1_coefficient=0.5, d_sae=16,
                         total_tokens=160_000, batch_size=256, lr=1e-2, lr_decay_fraction=0.3, seed=seed,
                         progress=False, log_every=1000, matryoshka_prefixes=prefixes)
    store = ActivationStore(source, source.widths(), 256, 64 * 4096 * 4, seed=seed)
    dict_cfg = DictionaryConfig(d_in=16, d_sae=16, activation="relu", hook_in="x", hook_out="x",
                                apply_b_dec_to_input=True)
    torch.manual_seed(seed)
    result = Trainer(config, [DictionaryTrainer(config, dict_cfg, torch.device("cpu"))], ["x"], store).run()
    return data, result["dictionaries"][0]


def _parent_recall(data: ParentChildData, dictionary) -> float:
    """For each parent, the latent whose decoder is closest to it: the share of rows with the parent active
    on which that latent fires (absorbed parents fire on few of them), averaged over the parents."""
    data.generator.manual_seed(99)
    parent_on, child_on = data.coefficients(4096)
    x = parent_on @ data.parent_directions + child_on @ data.child_directions
    with torch.no_grad():
        _, acts = dictionary(x)
    decoders = dictionary.W_dec / dictionary.W_dec.norm(dim=-1, keepdim=True)
    latent = (data.parent_directions @ decoders.T).argmax(-1)  # [parents]
    fires = acts[:, latent] > 1e-3  # [rows, parents]
    return float(((fires & parent_on.bool()).sum(0) / parent_on.sum(0)).mean())


def test_matryoshka_prefix_keeps_parents_from_being_absorbed():
    data, plain = _train([])
    data_m, nested = _train([2])
    plain_recall, nested_recall = _parent_recall(data, plain), _parent_recall(data_m, nested)
    # the prefix of two latents must reconstruct alone, so it learns the two parents and they fire whenever
    # their parent is present; without the prefix, L1 folds the parents into the child latents
    assert nested_recall > 0.9, nested_recall
    assert plain_recall < 0.5, plain_recall


def _module(architecture: str):
    config = TrainConfig(hooks=["x"], dataset="synthetic", architecture=architecture, k=3, d_sae=12,
                         total_tokens=1024, batch_size=64, progress=False)
    dict_cfg = DictionaryConfig(d_in=8, d_sae=12, activation=architecture, k=3 if "topk" in architecture else None,
                                hook_in="x", hook_out="x")
    trainer = DictionaryTrainer(config, dict_cfg, torch.device("cpu"))
    module = trainer.module
    with torch.no_grad():
        module.b_dec.normal_()
    return module


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk"])
def test_matryoshka_loss_is_the_mean_of_the_nested_reconstruction_errors(architecture):
    torch.manual_seed(0)
    module = _module(architecture)
    x = torch.randn(32, 8)
    prefixes = (2, 7)
    if architecture == "relu":
        plain, nested = relu_loss(module, x, x, x, 0.0), relu_loss(module, x, x, x, 0.0, prefixes)
        acts = torch.addmm(module.b_enc, x, module.W_enc_t.t()).relu()
    elif architecture == "topk":
        plain, nested = (topk_loss(module, x, x, x, 3, None, 4, 0.0),
                         topk_loss(module, x, x, x, 3, None, 4, 0.0, prefixes))
        pre = torch.addmm(module.b_enc, x, module.W_enc_t.t())
        top = pre.topk(3, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        plain = batchtopk_loss(module, x, x, x, 3, None, 4, 0.0, 0.99)
        nested = batchtopk_loss(module, x, x, x, 3, None, 4, 0.0, 0.99, prefixes)
        pre = torch.addmm(module.b_enc, x, module.W_enc_t.t()).relu()
        kept = pre.reshape(-1).topk(3 * 32)
        acts = torch.zeros_like(pre).reshape(-1).scatter(0, kept.indices, kept.values).reshape(pre.shape)
    W_dec, b_dec, acts = module.W_dec.detach(), module.b_dec.detach(), acts.detach()
    errors = [((acts[:, :m] @ W_dec[:m] + b_dec - x) ** 2).sum(-1).mean() for m in (*prefixes, 12)]
    assert float(plain.recon_loss) == pytest.approx(float(errors[-1]), rel=1e-5)
    assert float(nested.loss.detach()) == pytest.approx(float(torch.stack(errors).mean()), rel=1e-5)
    assert float(nested.recon_loss) == pytest.approx(float(plain.recon_loss), rel=1e-6)  # logged: the full error


def test_bad_matryoshka_prefixes():
    base = dict(hooks=["x"], dataset="synthetic", architecture="relu", d_sae=16, total_tokens=1024, batch_size=64)
    with pytest.raises(ValueError, match=r"matryoshka_prefixes=\[8, 4\] must be strictly increasing"):
        TrainConfig(**base, matryoshka_prefixes=[8, 4]).validate()
    config = TrainConfig(**base, matryoshka_prefixes=[4, 16])
    config.validate()
    dict_cfg = DictionaryConfig(d_in=8, d_sae=16, activation="relu", hook_in="x", hook_out="x")
    with pytest.raises(ValueError, match=r"must stay below d_sae=16"):
        DictionaryTrainer(config, dict_cfg, torch.device("cpu"))

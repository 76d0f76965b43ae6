"""``TrainConfig.compile``: a compiled loss trains to the same weights as the eager one, compiles once, and a
broken compiler stops training with an error that names the fix.

Compiling is slow on CPU (inductor generates and builds C++; ~10-20 s for one loss on the shared 2-core
machine with a cold cache), so the suite compiles one loss with inductor and the other with aot_eager.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch._dynamo

from featcircuits.dictionaries import DictionaryConfig
from featcircuits.training import (
    ActivationStore,
    DictionaryTrainer,
    SuperpositionData,
    SyntheticSource,
    TrainConfig,
    Trainer,
)

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture
def fresh_dynamo():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(previous)


def _train(architecture: str, compile: bool, backend: str = "inductor", d_sae: int = 128, steps: int = 6):
    """A few steps on synthetic superposition data; the sparsity coefficient changes every step (warmup)."""
    torch.manual_seed(0)
    data = SuperpositionData(n_features=64, d=32, p_active=0.03, seed=0)
    source = SyntheticSource(data, "x", "x", rows=1024)
    config = TrainConfig(
        hooks=["x"], dataset="synthetic", architecture=architecture, d_sae=d_sae, total_tokens=256 * steps,
        batch_size=256, lr=1e-2, l0_coefficient=0.3, jumprelu_init_threshold=0.05, sparsity_warmup_steps=4,
        progress=False, log_every=3, compile=compile, compile_backend=backend,
    )
    store = ActivationStore(source, source.widths(), 256, 8 * 256 * 32 * 4, seed=0)
    dict_cfg = DictionaryConfig(d_in=32, d_out=32, d_sae=d_sae, kind="sae", activation=architecture,
                                hook_in="x", hook_out="x", apply_b_dec_to_input=True)
    trainer = DictionaryTrainer(config, dict_cfg, torch.device("cpu"))
    return Trainer(config, [trainer], ["x"], store).run()["dictionaries"][0]


def _inductor_can_build() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


@pytest.mark.parametrize("architecture, backend", [
    # inductor generates and builds C++ kernels: the real path; a machine without a compiler falls back to
    # aot_eager (the traced graph run eagerly), which still exercises the compiled loss and its autograd.
    ("relu", "inductor" if _inductor_can_build() else "aot_eager"),
    ("jumprelu", "aot_eager"),  # its straight-through autograd.Functions under compile, without a second build
])
def test_compiled_training_matches_eager(fresh_dynamo, architecture, backend):
    eager = _train(architecture, compile=False)
    # error_on_recompile: the coefficient changes every step; a recompilation per value would make compile a
    # slowdown (it once recompiled 6 times in 6 steps).
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _train(architecture, compile=True, backend=backend)
    for name in PARAMS:
        difference = (getattr(eager, name) - getattr(compiled, name)).abs().max().item()
        # Fused kernels reorder float sums (measured ~4e-7 after 6 steps); a wrong graph differs by >1e-2.
        assert difference <= 1e-4, (name, difference)
    assert (eager.W_enc != 0).any() and (eager.W_dec - compiled.W_dec).abs().max() <= 1e-4


def test_missing_cxx_compiler_names_the_fix(fresh_dynamo, monkeypatch, tmp_path):
    import torch._functorch.config
    import torch._inductor.config

    # A compiler that does not exist, and no cached kernels to fall back on (a fresh cache directory, and a
    # shape no other test compiles), so inductor must try to build.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    with pytest.raises(RuntimeError, match="compile_backend=aot_eager") as raised:
        _train("relu", compile=True, backend="inductor", d_sae=96, steps=2)
    assert "C++ compiler" in str(raised.value) and "relu" in str(raised.value)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="compile_backend='no_such_backend'"):
        _train("relu", compile=True, backend="no_such_backend", steps=1)

"""On a CUDA GPU, the results the CPU float32 tests establish, within stated tolerances: a bf16-autocast
training step, an attribution graph (built on the GPU and checked there by intervention) and an ACDC run.

Each test runs the same computation on the CPU in float32 (the reference) and on the GPU, from the same
weights and data. Skipped, with the reason, where no GPU is present; ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import STORIES260K, TINY_GPT2_CONFIG, random_token_task, relu_transcoders

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs these"),
]

CUDA = torch.device("cuda")
PROMPT = "Once upon a time there was"


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits on Ampere+ GPUs: the fp32 checks compare real fp32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _trainers(autocast: bool):
    from featcircuits import DictionaryConfig
    from featcircuits.training import TrainConfig
    from featcircuits.training.dictionary_trainer import DictionaryTrainer
    from featcircuits.training.synthetic import SuperpositionData

    config = TrainConfig(hooks=["x"], dataset="synthetic", architecture="topk", d_sae=512, k=16, batch_size=1024,
                         total_tokens=1024 * 30, lr=2e-3, progress=False, autocast=autocast)
    dict_cfg = DictionaryConfig(d_in=64, d_sae=512, activation="topk", k=16, hook_in="x")
    data = SuperpositionData(n_features=1024, d=64, p_active=0.01, seed=0)
    batches = [data.sample(1024)[0] for _ in range(30)]
    torch.manual_seed(0)
    cpu = DictionaryTrainer(config, dict_cfg, torch.device("cpu"))
    cpu.initialise(batches[0], batches[0])
    gpu = DictionaryTrainer(config, dict_cfg, CUDA)
    gpu.load_state_dict(cpu.state_dict())  # the same initial weights, scales and (empty) optimiser state
    return cpu, gpu, batches


def _relative(gpu_value: torch.Tensor, cpu_value: torch.Tensor) -> float:
    return float((gpu_value.detach().cpu().float() - cpu_value.detach().float()).norm()
                 / cpu_value.detach().float().norm().clamp_min(1e-30))


@pytest.mark.parametrize(("autocast", "loss_tol", "grad_tol", "fvu_tol"), [(True, 2e-2, 5e-2, 0.02),
                                                                          (False, 1e-4, 1e-3, 1e-3)])
def test_a_training_step_on_the_gpu_matches_the_cpu_float32_step(autocast, loss_tol, grad_tol, fvu_tol):
    """bf16 autocast keeps 8 mantissa bits in the matmuls (accumulation in fp32): the step's loss within 2%,
    every gradient within 5% (relative norm; TopK may pick another latent at a near tie), and after 30
    steps the FVU within 0.02 of the CPU run. Without autocast the GPU is fp32: 1e-4, 1e-3 and 1e-3."""
    cpu, gpu, batches = _trainers(autocast)
    cpu_out = cpu.train_step(batches[0], batches[0], 0)
    gpu_out = gpu.train_step(batches[0].to(CUDA), batches[0].to(CUDA), 0)
    cpu_loss, gpu_loss = float(cpu_out.loss.detach()), float(gpu_out.loss.detach())
    assert abs(gpu_loss - cpu_loss) <= loss_tol * abs(cpu_loss), (gpu_loss, cpu_loss)
    cpu_params, gpu_params = dict(cpu.module.named_parameters()), dict(gpu.module.named_parameters())
    compared = 0
    for name, param in cpu_params.items():
        if param.grad is None:
            continue
        gpu_grad = gpu_params[name].grad
        assert gpu_grad is not None, f"{name} has a gradient on the CPU only"
        assert _relative(gpu_grad, param.grad) <= grad_tol, name
        compared += 1
    assert compared >= 3  # encoder, decoder and biases all learn
    cpu.reset_running()
    gpu.reset_running()
    for step, batch in enumerate(batches[1:], start=1):
        cpu.train_step(batch, batch, step)
        gpu.train_step(batch.to(CUDA), batch.to(CUDA), step)
    cpu_fvu, gpu_fvu = cpu.running_metrics()["fvu"], gpu.running_metrics()["fvu"]
    assert cpu_fvu < 0.9  # it learned something, so agreeing is not trivial
    assert abs(gpu_fvu - cpu_fvu) <= fvu_tol, (gpu_fvu, cpu_fvu)


def test_an_attribution_graph_built_on_the_gpu_verifies_and_matches_the_cpu_graph(stories_model):
    """fp32 on both sides: the GPU graph's edges are confirmed by intervention on the GPU to 1e-4 relative
    (the CPU test holds 1e-5; the GPU reorders reductions), and agree with the CPU graph's on the shared
    nodes to 1e-4 of the largest edge; at most 1% of the CPU's active features differ (a pre-activation at
    zero may round either way)."""
    from featcircuits import load_model
    from featcircuits.graph import build_graph, verify

    cpu_dictionaries = relu_transcoders(stories_model, d_sae=64, bias=-0.9, seed=1)
    gpu_dictionaries = [copy.deepcopy(dictionary).to(CUDA) for dictionary in cpu_dictionaries]
    gpu_model = load_model(STORIES260K, device=CUDA)
    cpu_graph = build_graph(stories_model, cpu_dictionaries, PROMPT, progress=False)
    gpu_graph = build_graph(gpu_model, gpu_dictionaries, PROMPT, progress=False)
    assert gpu_graph.adjacency.device.type == "cuda"  # built on the GPU, not moved back and forth

    result = verify(gpu_graph, n_sources=40, seed=0)
    assert result.max_rel_error <= 1e-4, result
    assert result.predicted.abs().max() > 1e-2  # the checked effects are real

    cpu_keys = {tuple(key): index for index, key in enumerate(cpu_graph.node_keys.tolist())}
    gpu_keys = {tuple(key): index for index, key in enumerate(gpu_graph.node_keys.tolist())}
    shared = [key for key in cpu_keys if key in gpu_keys]
    assert len(shared) >= 0.99 * len(cpu_keys) and len(cpu_keys) > 100
    cpu_index = torch.tensor([cpu_keys[key] for key in shared])
    gpu_index = torch.tensor([gpu_keys[key] for key in shared])
    cpu_adjacency = cpu_graph.adjacency[cpu_index][:, cpu_index]
    gpu_adjacency = gpu_graph.adjacency.cpu()[gpu_index][:, gpu_index]
    scale = float(cpu_adjacency.abs().max())
    assert float((gpu_adjacency - cpu_adjacency).abs().max()) <= 1e-4 * scale


def test_acdc_on_the_gpu_keeps_the_edges_the_cpu_run_keeps(tiny_gpt2):
    """The same edge order and tau on both devices: the same kept edges, each edge's measured effect within
    1e-4 (absolute, on a logit difference of order 1), unless the first disagreement is an edge whose CPU
    effect lies within that tolerance of the threshold (a tie either device may break)."""
    from featcircuits import load_model
    from featcircuits.circuits import ComponentGraph, acdc

    gpu_model = load_model(TINY_GPT2_CONFIG, seed=0, device=CUDA)
    gpu_model.load_state_dict(tiny_gpt2.state_dict())
    cpu_graph = ComponentGraph(tiny_gpt2, random_token_task(tiny_gpt2, 4, 6, 0), ablation="patch")
    gpu_graph = ComponentGraph(gpu_model, random_token_task(gpu_model, 4, 6, 0), ablation="patch")
    assert gpu_graph.edge_ids == cpu_graph.edge_ids
    assert gpu_graph.full_metric == pytest.approx(cpu_graph.full_metric, abs=1e-4)
    n_edges = len(cpu_graph.edge_ids)
    order = list(reversed(range(n_edges)))
    cpu_run = acdc(cpu_graph.edge_metric, order, n_edges, tau=0.05, batch_size=64)
    gpu_run = acdc(gpu_graph.edge_metric, order, n_edges, tau=0.05, batch_size=64)
    assert 0 < int(cpu_run.keep.sum()) < n_edges  # a real choice was made
    cpu_keep, gpu_keep = cpu_run.keep.cpu(), gpu_run.keep.cpu()
    cpu_scores, gpu_scores = cpu_run.scores.cpu(), gpu_run.scores.cpu()
    differing = [edge for edge in order if bool(cpu_keep[edge]) != bool(gpu_keep[edge])]
    agreed = order
    if differing:
        first = differing[0]
        assert abs(float(cpu_scores[first]) - float(cpu_run.threshold)) <= 1e-4, (
            f"ACDC kept different edges on the GPU from edge {cpu_graph.edge_ids[first]} on, whose CPU effect "
            f"{float(cpu_scores[first]):.6f} is not at the threshold {float(cpu_run.threshold):.6f}")
        agreed = order[: order.index(first)]
    agreed_index = torch.tensor(agreed, dtype=torch.long)
    tried = torch.isfinite(cpu_scores[agreed_index])  # a unit never tried scores inf on both devices
    assert torch.equal(tried, torch.isfinite(gpu_scores[agreed_index])) and bool(tried.any())
    assert float((gpu_scores[agreed_index][tried] - cpu_scores[agreed_index][tried]).abs().max()) <= 1e-4
    assert float(gpu_run.threshold) == pytest.approx(float(cpu_run.threshold), abs=1e-4)

"""Achieved TFLOP/s of large matmuls and of an SAE training step, as fractions of the GPU's peak.

The peak is looked up by the device's name in ``PEAKS`` (NVIDIA datasheet figures, dense, without the
2:4 sparsity factor): bf16 tensor-core and fp32 (CUDA-core; TF32 is switched off, so fp32 is fp32).
A device not listed prints its TFLOP/s with the fraction as ``n/a``; ``--peak-bf16`` / ``--peak-fp32``
give the figures by hand.

The training step is featcircuits' own (``DictionaryTrainer.train_step``, bf16 autocast) for a
GPT-2-small-shaped TopK SAE: d_in 768, 16,384 latents, k 32, 4,096 rows per step. Its FLOPs are the ones
the step needs: the dense encoder forward ``2 B d n`` plus the sparse TopK parts (encoder weight gradient,
decoder forward, its weight and input gradients: ``8 B k d``); tokens/s is rows per second.

    python benchmarks/gpu_throughput.py                # on the GPU; without one, says so and exits 0
    python benchmarks/gpu_throughput.py --device cpu   # the same code on the CPU, small sizes (a check)

Last line: ``device=<name> matmul_bf16_tflops=<a> matmul_bf16_fraction=<b> matmul_fp32_tflops=<c>
matmul_fp32_fraction=<d> train_tokens_per_s=<e> train_step_tflops=<f> train_step_fraction=<g>``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name pattern, dense bf16 tensor TFLOP/s, fp32 TFLOP/s); the first match wins, so longer names come first.
PEAKS: list[tuple[str, float, float]] = [
    (r"H200 NVL", 835.5, 60.0),
    (r"H200", 989.5, 67.0),
    (r"H100 NVL", 835.5, 60.0),
    (r"H100 PCIe", 756.0, 51.0),
    (r"H100", 989.5, 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0, 19.5),
    (r"L40S", 362.0, 91.6),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bA10\b", 125.0, 31.2),
]


def peak_for(name: str) -> tuple[float | None, float | None]:
    for pattern, bf16, fp32 in PEAKS:
        if re.search(pattern, name):
            return bf16, fp32
    return None, None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iterations: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), the device synchronised around the loop."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    _synchronize(device)
    return (time.perf_counter() - started) / iterations


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, iterations: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.matmul(a, b, out=out), device, iterations)
    return 2 * n**3 / seconds / 1e12


def train_step_figures(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, steps: int) -> tuple[float, float]:
    """``(rows per second, TFLOP/s)`` of featcircuits' TopK SAE training step."""
    from featcircuits import DictionaryConfig
    from featcircuits.training import TrainConfig
    from featcircuits.training.dictionary_trainer import DictionaryTrainer

    config = TrainConfig(hooks=["x"], dataset="synthetic", architecture="topk", d_sae=d_sae, k=k, batch_size=batch,
                         total_tokens=batch * 10_000, lr=4e-4, progress=False, autocast=True,
                         init_b_dec_geometric_median=False)
    trainer = DictionaryTrainer(config, DictionaryConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, hook_in="x"),
                                device)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randn(batch, d_in, device=device, generator=generator) for _ in range(4)]
    trainer.initialise(batches[0], batches[0])
    step = [0]

    def one_step() -> None:
        x = batches[step[0] % len(batches)]
        trainer.train_step(x, x, step[0])
        step[0] += 1

    seconds = timed(one_step, device, steps, warmup=5)
    flops = 2 * batch * d_in * d_sae + 8 * batch * k * d_in
    return batch / seconds, flops / seconds / 1e12


def _fraction(achieved: float, peak: float | None) -> str:
    return "n/a" if peak is None else f"{achieved / peak:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "")
    parser.add_argument("--peak-bf16", type=float, default=None, help="dense bf16 TFLOP/s of an unlisted device")
    parser.add_argument("--peak-fp32", type=float, default=None, help="fp32 TFLOP/s of an unlisted device")
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if not args.device:
        print(f"uptime: {load}")
        print("no CUDA device (torch.cuda.is_available() is False): the matmul and training-step GPU figures are "
              "skipped; `--device cpu` runs the same code on the CPU at small sizes")
        return
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 measured as fp32
        name = torch.cuda.get_device_name(device)
        peak_bf16, peak_fp32 = peak_for(name)
    else:
        name, peak_bf16, peak_fp32 = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", None, None
    peak_bf16 = args.peak_bf16 or peak_bf16
    peak_fp32 = args.peak_fp32 or peak_fp32
    print(f"uptime: {load}")
    print(f"device: {name}; peak bf16 {peak_bf16 or 'unknown'} TFLOP/s, fp32 {peak_fp32 or 'unknown'} TFLOP/s "
          "(dense, datasheet)")
    n = 8192 if on_gpu else 1024
    bf16 = matmul_tflops(n, torch.bfloat16, device, 50 if on_gpu else 3)
    fp32 = matmul_tflops(n, torch.float32, device, 10 if on_gpu else 3)
    print(f"matmul {n}x{n}x{n}: bf16 {bf16:.4g} TFLOP/s (fraction {_fraction(bf16, peak_bf16)}), fp32 {fp32:.4g} "
          f"TFLOP/s (fraction {_fraction(fp32, peak_fp32)})")
    shape = (768, 16384, 32, 4096, 30) if on_gpu else (768, 2048, 32, 1024, 3)
    tokens, step_tflops = train_step_figures(device, *shape)
    print(f"SAE training step (d_in {shape[0]}, {shape[1]} latents, TopK k {shape[2]}, batch {shape[3]}, bf16 autocast"
          f"{'' if on_gpu else ', not applied on the CPU'}): {tokens:,.0f} tokens/s, {step_tflops:.4g} TFLOP/s "
          f"(fraction of bf16 peak {_fraction(step_tflops, peak_bf16)})")
    print(f"device={name.split(' (')[0].replace(' ', '_')} matmul_bf16_tflops={bf16:.4g} "
          f"matmul_bf16_fraction={_fraction(bf16, peak_bf16)} matmul_fp32_tflops={fp32:.4g} "
          f"matmul_fp32_fraction={_fraction(fp32, peak_fp32)} train_tokens_per_s={tokens:.0f} "
          f"train_step_tflops={step_tflops:.4g} "
          f"train_step_fraction={_fraction(step_tflops, peak_bf16)}")


if __name__ == "__main__":
    main()

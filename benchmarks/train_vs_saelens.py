"""featcircuits vs sae-lens: the same activations, the same SAE configuration, trained in one run.

Both train on the same sequence of batches drawn from one activations tensor (synthetic superposition
data rescaled to mean norm sqrt(d_in), so FVU is meaningful); each step is the library's own training
step (sae-lens: ``training_forward_pass`` + backward + grad clipping + Adam, as its ``SAETrainer`` does,
with dead-latent tracking for the AuxK loss; TopK with ``use_sparse_activations=True``, its fastest
documented CPU setting). Throughput excludes warm-up steps; FVU and L0 are measured after training on
held-out rows with each library's inference forward.

    python benchmarks/train_vs_saelens.py                       # d_in 768, d_sae 16384, batch 4096
    python benchmarks/train_vs_saelens.py --d-in 256 --d-sae 4096 --batch-size 1024 --steps 30

Last line: speedup_vs_saelens=<x> fvu_ours=<a> fvu_saelens=<b> l0_ours=<c> l0_saelens=<d> (TopK).
"""

from __future__ import annotations

import argparse
import time

import torch

from featcircuits.dictionaries import DictionaryConfig
from featcircuits.training import DictionaryTrainer, SuperpositionData, TrainConfig


def make_activations(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    data = SuperpositionData(n_features=4 * args.d_in, d=args.d_in, p_active=min(0.5, 24 / (4 * args.d_in)),
                             seed=args.seed)
    train, _ = data.sample(args.batch_size * args.steps)
    held_out, _ = data.sample(4096)
    scale = args.d_in**0.5 / train.norm(dim=-1).mean()
    return train * scale, held_out * scale


def fvu_and_l0(reconstruction: torch.Tensor, feature_acts: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    fvu = ((reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return fvu, (feature_acts > 0).float().sum(-1).mean().item()


def run_ours(args, architecture: str, train: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    config = TrainConfig(
        hooks=["x"], dataset="benchmark", architecture=architecture, k=args.k, d_sae=args.d_sae,
        total_tokens=args.batch_size * args.steps, batch_size=args.batch_size, lr=args.lr, lr_decay_fraction=0.0,
        l1_coefficient=args.l1_coefficient, auxk_coefficient=1 / 32, progress=False,
        init_b_dec_geometric_median=True, normalize_activations=False,
    )
    dict_cfg = DictionaryConfig(d_in=args.d_in, d_sae=args.d_sae, activation=architecture,
                                k=args.k if architecture == "topk" else None, hook_in="x",
                                apply_b_dec_to_input=True)
    trainer = DictionaryTrainer(config, dict_cfg, torch.device("cpu"))
    trainer.initialise(train[: args.batch_size], train[: args.batch_size])
    seconds = 0.0
    for step in range(args.steps):
        batch = train[step * args.batch_size:(step + 1) * args.batch_size]
        started = time.perf_counter()
        trainer.train_step(batch, batch, step)
        if step >= args.warmup_steps:
            seconds += time.perf_counter() - started
    dictionary = trainer.module.export()
    with torch.no_grad():
        reconstruction, feature_acts = dictionary(held_out)
    fvu, l0 = fvu_and_l0(reconstruction, feature_acts, held_out)
    return {"tokens_per_second": args.batch_size * (args.steps - args.warmup_steps) / seconds, "fvu": fvu, "l0": l0}


def run_saelens(args, architecture: str, train: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.d_sae, k=args.k, use_sparse_activations=True, aux_loss_coefficient=1 / 32,
            # sae-lens 6.54 fails in backward (aten::view on a sparse tensor) when it also rescales by decoder
            # norms, so the sparse path runs with that rescaling off.
            rescale_acts_by_decoder_norm=False,
            apply_b_dec_to_input=True, dtype="float32", device="cpu"))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.d_sae, l1_coefficient=args.l1_coefficient, apply_b_dec_to_input=True,
            dtype="float32", device="cpu"))
    with torch.no_grad():  # the same data-dependent start as ours (sae-lens' b_dec_init_method="geometric_median")
        from featcircuits.training import geometric_median

        sae.b_dec.copy_(geometric_median(train[: args.batch_size]))
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    steps_since_fired = torch.zeros(args.d_sae)
    dead_after_steps = 10_000_000 // args.batch_size
    coefficients = {"l1": args.l1_coefficient} if architecture == "relu" else {}
    seconds = 0.0
    for step in range(args.steps):
        batch = train[step * args.batch_size:(step + 1) * args.batch_size]
        started = time.perf_counter()
        output = sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients=coefficients, dead_neuron_mask=steps_since_fired > dead_after_steps,
            n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            did_fire = output.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            steps_since_fired += 1
            steps_since_fired[did_fire] = 0
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup_steps:
            seconds += time.perf_counter() - started
    sae.eval()
    with torch.no_grad():
        feature_acts = sae.encode(held_out)
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        reconstruction = sae.decode(feature_acts)
    fvu, l0 = fvu_and_l0(reconstruction, feature_acts, held_out)
    return {"tokens_per_second": args.batch_size * (args.steps - args.warmup_steps) / seconds, "fvu": fvu, "l0": l0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--l1-coefficient", type=float, default=5.0)
    parser.add_argument("--architectures", default="topk,relu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held_out = make_activations(args)
    print(f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch_size} steps={args.steps} "
          f"threads={torch.get_num_threads()} device=cpu")
    results = {}
    for architecture in args.architectures.split(","):
        torch.manual_seed(args.seed)
        ours = run_ours(args, architecture, train, held_out)
        torch.manual_seed(args.seed)
        theirs = run_saelens(args, architecture, train, held_out)
        results[architecture] = (ours, theirs)
        print(f"{architecture}: featcircuits {ours['tokens_per_second']:.0f} tok/s fvu={ours['fvu']:.4f} "
              f"l0={ours['l0']:.1f} | sae-lens {theirs['tokens_per_second']:.0f} tok/s fvu={theirs['fvu']:.4f} "
              f"l0={theirs['l0']:.1f} | speedup {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x")
    ours, theirs = results.get("topk", next(iter(results.values())))
    print(f"speedup_vs_saelens={ours['tokens_per_second'] / theirs['tokens_per_second']:.2f} "
          f"fvu_ours={ours['fvu']:.4f} fvu_saelens={theirs['fvu']:.4f} l0_ours={ours['l0']:.1f} "
          f"l0_saelens={theirs['l0']:.1f}")


if __name__ == "__main__":
    main()

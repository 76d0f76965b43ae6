"""Cross-layer transcoders between featcircuits and circuit-tracer, both ways, through each side's own loader.

circuit-tracer lives in its own virtual environment (it pins an older transformers); setup as in
benchmarks/graph_vs_circuit_tracer.py:

    python3 -m venv /tmp/fc-graph-ct-venv
    /tmp/fc-graph-ct-venv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0

Then, from the repository root with featcircuits' environment active:

    python benchmarks/check_clt_format.py [--ct-python /tmp/fc-graph-ct-venv/bin/python] [--out DIR]

1. ``write`` (featcircuits' env): random ReLU, JumpReLU and BatchTopK CLTs at stories260k's shape (5 layers,
   d_model 64, d_sae 512) saved with ``save_dictionary(clt, dir, format="circuit-tracer")``, with the feature
   activations and reconstructions featcircuits computes on random inputs.
2. ``check`` (circuit-tracer's env, imports no featcircuits): each directory loaded by
   ``circuit_tracer.utils.caching.load_transcoders_from_cache`` (the loader that reads ``config.yaml`` and calls
   ``load_clt``; lazy decoders, as it defaults to), its ``encode`` and ``forward`` compared with ours.
3. ``ct-write`` (circuit-tracer's env): random circuit-tracer ``CrossLayerTranscoder`` s (ReLU and JumpReLU)
   written with its ``to_safetensors`` and the ``config.yaml`` its cache writes, with its own outputs.
4. ``fc-check`` (featcircuits' env): those loaded by ``featcircuits.load_dictionaries`` and compared.

Everything runs in float64 (the 1e-6 tolerance) and float32 (reported: matmul against circuit-tracer's
per-feature index_add, the same numbers summed in another order). Prints one line per direction and
``max_abs_diff=...``; exits 1 when a float64 difference exceeds 1e-6.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

N_LAYERS, D_MODEL, D_SAE, N_TOKENS = 5, 64, 512, 256  # stories260k's depth and width
TOLERANCE = 1e-6  # on float64 weights and inputs, where both sides' summation orders agree to ~1e-14
DTYPES = ("float64", "float32")  # float32: the same files in single precision, reported beside (no tolerance)
OURS = {"relu": ("relu", None), "jumprelu": ("jumprelu", None), "batchtopk": ("batchtopk", 32)}
THEIRS = ("relu", "jump_relu")


def write(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from featcircuits.dictionaries import Dictionary, DictionaryConfig, save_dictionary

    torch.manual_seed(0)
    for (name, (activation, k)), dtype in ((item, dtype) for item in OURS.items() for dtype in DTYPES):
        x = torch.randn(N_TOKENS, N_LAYERS, D_MODEL, dtype=getattr(torch, dtype))
        cfg = DictionaryConfig(d_in=D_MODEL, d_sae=D_SAE, kind="cross_layer_transcoder", n_layers=N_LAYERS,
                               activation=activation, k=k, hook_in="blocks.{layer}.ln2.hook_normalized",
                               hook_out="blocks.{layer}.hook_mlp_out", model_name="stories260k", dtype=dtype)
        clt = Dictionary.from_config(cfg)
        with torch.no_grad():
            for param in clt.parameters():
                param.copy_(torch.randn_like(param) * 0.2)
            if clt.threshold is not None:
                clt.set_threshold(torch.rand_like(clt.threshold) * 0.5)
        save_dictionary(clt, out / f"{name}-{dtype}", format="circuit-tracer")
        with torch.no_grad():
            reconstruction, feature_acts = clt(x)
        save_file({"x": x, "reconstruction": reconstruction, "feature_acts": feature_acts},
                  out / f"{name}-{dtype}.expected.safetensors")


def check(out: Path) -> dict:
    import torch
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from safetensors.torch import load_file

    report: dict = {"version": importlib.metadata.version("circuit-tracer"), "lines": [],
                    **{f"max_abs_diff_{dtype}": 0.0 for dtype in DTYPES}}
    for name, dtype in ((name, dtype) for name in OURS for dtype in DTYPES):
        expected = load_file(out / f"{name}-{dtype}.expected.safetensors")
        clt, _ = load_transcoders_from_cache(f"{name}-{dtype}", cache_dir=out, device=torch.device("cpu"),
                                             dtype=getattr(torch, dtype))
        x = expected["x"].transpose(0, 1).contiguous()  # circuit-tracer stacks layers first: [n_layers, pos, d]
        with torch.no_grad():
            acts = clt.encode(x).transpose(0, 1)
            reconstruction = clt(x).transpose(0, 1)
        acts_diff = float((acts - expected["feature_acts"]).abs().max())
        out_diff = float((reconstruction - expected["reconstruction"]).abs().max())
        scale = float(expected["reconstruction"].abs().max())
        report["lines"].append(f"{name} {dtype}: {clt.n_layers} layers, max |diff| acts {acts_diff:.3g} out "
                               f"{out_diff:.3g} (max |out| {scale:.3g})")
        report[f"max_abs_diff_{dtype}"] = max(report[f"max_abs_diff_{dtype}"], acts_diff, out_diff)
    return report


def ct_write(out: Path) -> dict:
    import torch
    import yaml
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from safetensors.torch import save_file

    torch.manual_seed(1)
    for name, dtype in ((name, dtype) for name in THEIRS for dtype in DTYPES):
        x = torch.randn(N_LAYERS, N_TOKENS, D_MODEL, dtype=getattr(torch, dtype))
        clt = CrossLayerTranscoder(N_LAYERS, D_SAE, D_MODEL, activation_function=name, lazy_decoder=False,
                                   feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
                                   device=torch.device("cpu"), dtype=getattr(torch, dtype))
        with torch.no_grad():
            for param in clt.parameters():
                param.copy_(torch.randn_like(param) * 0.2)
            if name == "jump_relu":
                clt.activation_function.threshold.uniform_(0.0, 0.5)  # type: ignore[union-attr]
            acts = clt.encode(x)
            reconstruction = clt(x)
        clt.to_safetensors(str(out / f"{name}-{dtype}"))
        # what circuit-tracer's save_transcoders_to_cache writes beside the files
        config = {"model_kind": "cross_layer_transcoder", "model_name": "stories260k",
                  "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out", "scan": name}
        (out / f"{name}-{dtype}" / "config.yaml").write_text(yaml.dump(config))
        save_file({"x": x, "feature_acts": acts, "reconstruction": reconstruction},
                  out / f"{name}-{dtype}.expected.safetensors")
    return {"version": importlib.metadata.version("circuit-tracer")}


def fc_check(out: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    import featcircuits as fc

    report: dict = {"lines": [], **{f"max_abs_diff_{dtype}": 0.0 for dtype in DTYPES}}
    for name, dtype in ((name, dtype) for name in THEIRS for dtype in DTYPES):
        expected = load_file(out / f"{name}-{dtype}.expected.safetensors")
        (clt,) = fc.load_dictionaries(str(out / f"{name}-{dtype}"))
        assert clt.dtype == getattr(torch, dtype)
        x = expected["x"].transpose(0, 1)  # featcircuits stacks layers before the features: [pos, n_layers, d]
        with torch.no_grad():
            reconstruction, acts = clt(x)
        acts_diff = float((acts.transpose(0, 1) - expected["feature_acts"]).abs().max())
        out_diff = float((reconstruction.transpose(0, 1) - expected["reconstruction"]).abs().max())
        scale = float(expected["reconstruction"].abs().max())
        report["lines"].append(f"{name} {dtype}: {clt.cfg.n_layers} layers ({clt.cfg.activation}), max |diff| acts "
                               f"{acts_diff:.3g} out {out_diff:.3g} (max |out| {scale:.3g})")
        report[f"max_abs_diff_{dtype}"] = max(report[f"max_abs_diff_{dtype}"], acts_diff, out_diff)
    return report


def _in_ct_env(ct_python: str, step: str, out: Path) -> dict:
    result = subprocess.run([ct_python, __file__, step, "--out", str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"circuit-tracer step {step!r} failed in {ct_python}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["write", "check", "ct-write", "fc-check"], help="one step only")
    parser.add_argument("--out", type=Path, help="directory for the files (default: a temporary one)")
    parser.add_argument("--ct-python", default="/tmp/fc-graph-ct-venv/bin/python", help="circuit-tracer's python")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="featcircuits-clt-"))
    steps = {"write": write, "check": check, "ct-write": ct_write, "fc-check": fc_check}
    if args.step is not None:  # one step on the files in --out (the directory its counterpart step writes)
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(steps[args.step](out) or {}))
        return
    ours, theirs = out / "featcircuits", out / "circuit-tracer"
    ours.mkdir(parents=True, exist_ok=True)
    theirs.mkdir(parents=True, exist_ok=True)
    write(ours)
    forward = _in_ct_env(args.ct_python, "check", ours)
    backward_meta = _in_ct_env(args.ct_python, "ct-write", theirs)
    backward = fc_check(theirs)
    print(f"circuit-tracer {forward['version']} loading featcircuits CLTs: {'; '.join(forward['lines'])}")
    print(f"featcircuits loading circuit-tracer {backward_meta['version']} CLTs: {'; '.join(backward['lines'])}")
    worst = {dtype: max(forward[f"max_abs_diff_{dtype}"], backward[f"max_abs_diff_{dtype}"]) for dtype in DTYPES}
    print(f"max_abs_diff={worst['float64']:.3g} (float64, tolerance {TOLERANCE:g}) "
          f"max_abs_diff_float32={worst['float32']:.3g} (summation order only)")
    if worst["float64"] > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()

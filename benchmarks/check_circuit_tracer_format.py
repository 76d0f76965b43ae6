"""Load transcoder sets written by featcircuits with circuit-tracer's own loader and compare outputs.

circuit-tracer pins transformers <= 4.57.3, so it lives in its own virtual environment; the test suite
checks the layout without it (tests/test_formats_circuit_tracer.py). One-time setup (a CPU torch wheel):

    python -m venv /tmp/ct-venv && /tmp/ct-venv/bin/pip install torch==2.13.0 circuit-tracer

The PyPI release (0.5.0) ignores ``activation: topk`` in config.yaml and runs TopK sets as ReLU; TopK needs
circuit-tracer's main branch (tested at commit 4bb8c0ea10bde09727e14565ec8469656880da53):

    /tmp/ct-venv/bin/pip install --no-deps git+https://github.com/decoderesearch/circuit-tracer@4bb8c0ea10bde09727e14565ec8469656880da53

Then, from the repository root with featcircuits' own environment active:

    python benchmarks/check_circuit_tracer_format.py [--ct-python /tmp/ct-venv/bin/python] [--out DIR]

``frontend-setup`` installs, once, the npm packages that stand in for the scripts circuit-tracer's frontend page
fetches from CDNs (d3, d3-jetpack, dagre, pako) into a cache folder outside the repository (``--npm-cache``,
default ``~/.cache/featcircuits/circuit-tracer-frontend-npm``); tests/test_circuit_tracer_frontend.py then serves
our graph files with circuit-tracer's own server and frontend and skips, saying so, where either is missing.

``write`` (featcircuits' env) saves random ReLU/JumpReLU/TopK, plain and skip, transcoder sets and the
outputs featcircuits computes on random inputs; ``check`` (circuit-tracer's env, imports no featcircuits)
loads each set with ``circuit_tracer.utils.hf_utils.load_transcoders`` (the loader behind
``load_transcoder_from_hub``) and compares. Prints one
line: the largest absolute difference in features and outputs over all sets and layers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

D_MODEL, D_SAE, N_LAYERS, N_TOKENS = 64, 512, 5, 256  # stories260k's width and depth
SETS = {  # name -> (kind, activation, k)
    "relu": ("transcoder", "relu", None),
    "relu_skip": ("skip_transcoder", "relu", None),
    "jumprelu": ("transcoder", "jumprelu", None),
    "jumprelu_skip": ("skip_transcoder", "jumprelu", None),
    "topk": ("transcoder", "topk", 16),
}


def write(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from featcircuits.dictionaries import Dictionary, DictionaryConfig
    from featcircuits.dictionaries.io import save_dictionary

    torch.manual_seed(0)
    x = torch.randn(N_LAYERS, N_TOKENS, D_MODEL)
    for name, (kind, activation, k) in SETS.items():
        dictionaries = []
        for layer in range(N_LAYERS):
            cfg = DictionaryConfig(d_in=D_MODEL, d_sae=D_SAE, kind=kind, activation=activation, k=k, layer=layer,
                                   hook_in=f"blocks.{layer}.ln2.hook_normalized",
                                   hook_out=f"blocks.{layer}.hook_mlp_out", model_name="stories260k")
            dictionary = Dictionary.from_config(cfg)
            with torch.no_grad():
                for param in dictionary.parameters():
                    param.copy_(torch.randn_like(param) * 0.2)
                if dictionary.threshold is not None:
                    dictionary.threshold.uniform_(0.0, 0.5)
                if activation == "topk":  # >= k positive pre-activations, where the two TopKs agree
                    dictionary.b_enc.add_(5.0)
            dictionaries.append(dictionary)
        save_dictionary(dictionaries, out / name, format="circuit-tracer")
        with torch.no_grad():
            outputs = [d(x[layer]) for layer, d in enumerate(dictionaries)]
        save_file({"x": x, "reconstruction": torch.stack([o.reconstruction for o in outputs]),
                   "feature_acts": torch.stack([o.feature_acts for o in outputs])}, out / f"{name}.expected.safetensors")


def check(out: Path) -> dict:
    import torch
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import load_file

    worst: dict = {"feature_acts": 0.0, "reconstruction": 0.0, "sets": []}
    version = importlib.metadata.version("circuit-tracer")
    for name in SETS:
        expected = load_file(out / f"{name}.expected.safetensors")
        # circuit-tracer's config.yaml path (what load_transcoder_from_hub does after downloading): our yaml
        # with the layer files resolved; its cache loader would ignore activation/k.
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        config["transcoders"] = [str(out / name / file) for file in config["transcoders"]]
        try:
            transcoders = load_transcoders(config, device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
        except Exception as err:  # e.g. an older circuit-tracer without TopK support
            worst["sets"].append(f"{name}: not loadable ({type(err).__name__}: {err})")
            continue
        acts_diff = out_diff = 0.0
        with torch.no_grad():
            for layer, transcoder in enumerate(transcoders):
                x = expected["x"][layer]
                acts_diff = max(acts_diff, float((transcoder.encode(x) - expected["feature_acts"][layer]).abs().max()))
                # SingleLayerTranscoder.forward: decode plus the skip path
                out_diff = max(out_diff, float((transcoder(x) - expected["reconstruction"][layer]).abs().max()))
        worst["sets"].append(f"{name}: {len(transcoders)} layers, max |diff| acts {acts_diff:.3g} out {out_diff:.3g}")
        worst["feature_acts"], worst["reconstruction"] = max(worst["feature_acts"], acts_diff), max(worst["reconstruction"], out_diff)
    worst["version"] = version
    return worst


# the npm packages the frontend test serves in place of the page's CDN scripts (unpkg serves npm's files)
FRONTEND_PACKAGES = ["d3@7.9.0", "d3-jetpack@2.3.0", "d3-collection@1.0.7", "dagre@0.8.5", "pako@2.1.0"]
NPM_CACHE = Path.home() / ".cache" / "featcircuits" / "circuit-tracer-frontend-npm"


def frontend_setup(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(cache),
                             *FRONTEND_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"npm install into {cache} failed:\n{result.stderr[-2000:]}")
    print(f"installed {' '.join(FRONTEND_PACKAGES)} into {cache / 'node_modules'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["write", "check", "frontend-setup"], help="run one half only")
    parser.add_argument("--out", type=Path, help="directory for the sets (default: a temporary one)")
    parser.add_argument("--ct-python", default="/tmp/ct-venv/bin/python", help="python of the circuit-tracer venv")
    parser.add_argument("--npm-cache", type=Path, default=NPM_CACHE, help="folder for frontend-setup's npm packages")
    args = parser.parse_args()
    if args.step == "frontend-setup":
        frontend_setup(args.npm_cache)
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="featcircuits-ct-"))
    if args.step == "check":
        print(json.dumps(check(out)))
        return
    write(out)
    if args.step == "write":
        return
    result = subprocess.run([args.ct_python, __file__, "check", "--out", str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"circuit-tracer check failed in {args.ct_python}:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"circuit-tracer {report['version']} loading featcircuits files: {'; '.join(report['sets'])}")


if __name__ == "__main__":
    main()

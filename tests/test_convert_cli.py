"""``featcircuits convert SRC DST --to FORMAT``: SAELens TopK and JumpReLU SAEs and a transcoder go round
native / saelens / circuit-tracer and come back to sae-lens with outputs identical to the originals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402
from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig  # noqa: E402

from featcircuits.cli import main  # noqa: E402
from featcircuits.dictionaries.io import detect_format, load_dictionaries  # noqa: E402

D_MODEL, D_SAE = 16, 64


def randomised(sae):
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn_like(param) * 0.3)
            if name == "threshold":
                param.abs_()
    return sae


def topk_sae():
    return TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=5, metadata=SAEMetadata(
        model_name="stories260k", hook_name="blocks.1.hook_resid_post")))


def jumprelu_sae():
    return JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=SAEMetadata(
        model_name="stories260k", hook_name="blocks.3.hook_resid_pre")))


def transcoder(layer: int = 0):
    return Transcoder(TranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False,
                                       metadata=SAEMetadata(model_name="stories260k",
                                                            hook_name=f"blocks.{layer}.ln2.hook_normalized",
                                                            hook_name_out=f"blocks.{layer}.hook_mlp_out")))


def max_output_difference(original, converted, x: torch.Tensor) -> float:
    with torch.no_grad():
        return max(float((original(x) - converted(x)).abs().max()),
                   float((original.encode(x) - converted.encode(x)).abs().max()))


def convert(src, dst, to: str, capsys) -> str:
    assert main(["convert", str(src), str(dst), "--to", to]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("make", "route"), [
    (topk_sae, ["native", "saelens"]),
    (jumprelu_sae, ["native", "saelens"]),
    (transcoder, ["circuit-tracer", "native", "saelens"]),
])
def test_convert_round_trips_with_zero_output_difference(tmp_path, capsys, make, route):
    original = randomised(make())
    original.save_model(tmp_path / "0")
    source = tmp_path / "0"
    for step, target in enumerate(route, start=1):
        out = convert(source, tmp_path / str(step), target, capsys)
        assert f"to {target.replace('-', '_')}" in out and "converted 1 dictionary" in out
        assert detect_format(tmp_path / str(step)) == target.replace("-", "_")
        source = tmp_path / str(step)
    converted = SAE.load_from_disk(str(source))
    assert type(converted) is type(original)
    assert converted.cfg.metadata.hook_name == original.cfg.metadata.hook_name
    assert converted.cfg.metadata.hook_name_out == original.cfg.metadata.hook_name_out
    assert converted.cfg.metadata.model_name == "stories260k"
    x = torch.randn(4, 6, D_MODEL)
    assert max_output_difference(original, converted, x) == 0.0
    assert (original.encode(x) > 0).any()


def test_transcoder_set_to_saelens_directories(tmp_path, capsys):
    originals = [randomised(transcoder(layer)) for layer in range(2)]
    for layer, original in enumerate(originals):
        original.save_model(tmp_path / "saelens" / f"layer{layer}")
    convert(tmp_path / "saelens", tmp_path / "ct", "circuit-tracer", capsys)
    assert [d.cfg.layer for d in load_dictionaries(tmp_path / "ct")] == [0, 1]
    out = convert(tmp_path / "ct", tmp_path / "back", "saelens", capsys)
    assert "converted 2 dictionaries from circuit_tracer" in out
    x = torch.randn(5, D_MODEL)
    for layer, original in enumerate(originals):
        converted = SAE.load_from_disk(str(tmp_path / "back" / f"blocks.{layer}.ln2.hook_normalized"))
        assert max_output_difference(original, converted, x) == 0.0


def test_convert_errors_are_reported_not_raised(tmp_path, capsys):
    randomised(topk_sae()).save_model(tmp_path / "sae")
    assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "out"), "--to", "sparsify"]) == 2
    assert "sparsify is a read-only format" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "out"), "--to", "onnx"]) == 2
    assert "--to 'onnx' is not a writable format" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "out"), "--to", "circuit-tracer"]) == 2
    assert "circuit-tracer holds transcoders" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "native"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_through_the_installed_command_line(tmp_path):
    original = randomised(jumprelu_sae())
    original.save_model(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "featcircuits.cli", "convert", str(tmp_path / "src"), str(tmp_path / "dst"),
         "--to", "native"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "converted 1 dictionary from saelens to native" in result.stdout
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "back"), "--to", "saelens"]) == 0
    converted = SAE.load_from_disk(str(tmp_path / "back"))
    assert max_output_difference(original, converted, torch.randn(8, D_MODEL)) == 0.0


def test_dictionaries_on_one_hook_get_separate_directories(tmp_path, capsys):
    originals = [randomised(topk_sae()) for _ in range(2)]
    for index, original in enumerate(originals):
        original.save_model(tmp_path / "src" / f"run{index}")
    assert "converted 2 dictionaries" in convert(tmp_path / "src", tmp_path / "dst", "native", capsys)
    converted = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert converted == ["blocks.1.hook_resid_post", "blocks.1.hook_resid_post_1"]
    x = torch.randn(5, D_MODEL)
    for original, name in zip(originals, converted, strict=True):
        assert torch.equal(load_dictionaries(tmp_path / "dst" / name)[0](x).reconstruction, original(x))

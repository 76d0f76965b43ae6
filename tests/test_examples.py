"""The example notebooks run: executed in order with nbclient (small settings) in one temporary folder.

Notebook 1 trains the dictionaries the others read, so the notebooks share ``FEATCIRCUITS_EXAMPLE_RUNS``.
The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH), so a fresh virtual
environment needs no ``ipykernel install``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO_ROOT, SHARED, STORIES260K

EXAMPLES = REPO_ROOT / "examples"
NOTEBOOKS = ["01_train_dictionaries", "02_feature_circuit", "03_feature_vs_component", "04_save_and_publish"]
KERNEL_NAME = "featcircuits-examples-test"
CELL_TIMEOUT_S = 300


def _text(notebook: nbformat.NotebookNode) -> str:
    """All stream and text/plain output of a notebook, in order."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nbformat.NotebookNode, Path]]:
    """Run every notebook once; ``{name: (executed notebook, working dir)}``."""
    from nbclient import NotebookClient

    if not (STORIES260K / "config.json").is_file():
        pytest.fail(f"stories260k is expected at {STORIES260K} (the shared/ folder beside the checkout).")
    root = tmp_path_factory.mktemp("examples")
    kernel_dir = root / "jupyter" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "featcircuits test", "language": "python",
    }))
    work = root / "work"
    work.mkdir()
    results = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(root / "jupyter"))
        env.setenv("FEATCIRCUITS_EXAMPLE_SCALE", "small")
        env.setenv("FEATCIRCUITS_SHARED", str(SHARED))
        env.setenv("FEATCIRCUITS_EXAMPLE_RUNS", str(work / "runs"))
        env.setenv("MPLBACKEND", "Agg")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        for name in NOTEBOOKS:
            notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
            client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                    resources={"metadata": {"path": str(work)}})
            client.execute()  # raises CellExecutionError naming the cell on any error
            results[name] = (notebook, work)
    return results


def test_committed_notebooks_have_no_outputs() -> None:
    found = sorted(p.stem for p in EXAMPLES.glob("*.ipynb"))
    assert found == NOTEBOOKS
    for name in NOTEBOOKS:
        notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {index} has outputs"


def _no_errors(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output


def test_01_trains_sae_and_transcoders(executed) -> None:
    notebook, work = executed["01_train_dictionaries"]
    _no_errors(notebook)
    text = _text(notebook)
    runs = work / "runs"
    assert (runs / "sae" / "blocks.2.hook_resid_post" / "dictionary.safetensors").is_file()
    layers = sorted(p.name for p in (runs / "transcoders").iterdir() if p.is_dir())
    assert layers == [f"blocks.{layer}.ln2.hook_normalized" for layer in range(5)]
    metrics = json.loads((runs / "transcoders" / "metrics.json").read_text())
    # what the notebook printed is what the run measured
    assert f"CE loss recovered {metrics['ce_loss_recovered']:.3f}" in text
    sae_fvu = json.loads((runs / "sae" / "metrics.json").read_text())["fvu"]
    assert f"FVU {sae_fvu:.3f}" in text
    assert 0 < sae_fvu < 1  # trained: better than predicting the mean
    # the reloaded transcoder's own FVU on the prompt, printed in the last cell
    assert float(re.search(r"FVU on this prompt ([-\d.]+)", text).group(1)) < 1


def test_02_graph_verifies_and_circuit_is_viewable(executed) -> None:
    notebook, work = executed["02_feature_circuit"]
    _no_errors(notebook)
    text = _text(notebook)
    errors = [float(v) for v in re.findall(r"max_rel_error=([0-9.eE+-]+)", text)]
    assert errors and max(errors) <= 1e-5
    match = re.search(r"task: (\d+) pairs where stories260k prefers the seen name", text)
    assert match and int(match.group(1)) >= 2
    faithfulness = float(re.search(r"faithfulness ([-\d.]+)", text).group(1))
    assert faithfulness > 0.5  # the circuit recovers most of the task metric
    for page in ("names_graph.html", "names_circuit.html"):
        path = work / page
        assert f"viewer: {path.resolve()}" in text
        assert path.stat().st_size > 1000 and "<script" in path.read_text(encoding="utf-8")
    assert (work / "runs" / "names_feature_circuit.json").is_file()


def test_03_compares_feature_and_component_circuits(executed) -> None:
    notebook, work = executed["03_feature_vs_component"]
    _no_errors(notebook)
    text = _text(notebook)
    for kind in ("features", "components"):
        assert re.search(rf"{kind}: +\d+ of +\d+ nodes +faithfulness [-\d.]+", text), kind
    png = work / "names_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
    # component nodes are heads and MLPs
    assert re.search(r"component circuit: \[.*'L\d+\.(H\d+|MLP)'", text)


def test_04_round_trips_and_dry_run(executed) -> None:
    notebook, work = executed["04_save_and_publish"]
    _no_errors(notebook)
    text = _text(notebook)
    differences = [float(v) for v in re.findall(r"max \|difference\| ([0-9.eE+-]+)", text)]
    assert len(differences) == 3 and max(differences) <= 1e-5
    assert (work / "saved" / "sae-saelens" / "sae_weights.safetensors").is_file()
    assert (work / "saved" / "transcoders-circuit-tracer" / "config.yaml").is_file()
    card = (work / "upload" / "README.md").read_text()
    assert "your-name/stories260k-transcoders" in card or "stories260k" in card
    assert card.strip() in text  # the notebook showed the model card it wrote
    assert os.path.isfile(work / "upload" / "native" / "blocks.0.ln2.hook_normalized" / "cfg.json")

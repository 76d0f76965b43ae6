"""A wheel of the project, installed into a fresh virtual environment, runs ``featcircuits demo``: the
registry and the bundled model travel as package data and are found without the source checkout.

The new environment sees this environment's dependencies through a ``.pth`` file naming its site-packages:
a plain path line only extends ``sys.path``, so the ``.pth`` hooks inside that directory (among them the
editable install's finder, which maps ``featcircuits`` to the checkout) never run there. Nothing is
downloaded: the wheel is built without build isolation and installed with ``--no-index --no-deps``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO_ROOT

# What the installed package reports about itself, printed as one JSON line.
_PROBE = """
import json, featcircuits
from featcircuits.hub.registry import REGISTRY_PATH, get_release
from featcircuits.pipeline.demo import BUNDLED_DIR
print(json.dumps({"file": featcircuits.__file__, "registry": str(REGISTRY_PATH), "bundled": str(BUNDLED_DIR),
                  "releases": featcircuits.list_releases(include_saelens=False),
                  "local_dir": str(get_release("bundled-transcoders").local_dir)}))
"""


def _run(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PIP_DISABLE_PIP_VERSION_CHECK="1")
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{command} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
    return completed


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the project's wheel (and the current environment's dependencies)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools in this environment (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("wheel_install")
    # Build from a copy: building in the checkout writes build/ and *.egg-info there, under other users' feet.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "featcircuits", source / "featcircuits",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(source)], cwd=root)
    (wheel,) = wheels.glob("featcircuits-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site_packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              cwd=root).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site_packages / "_parent_environment.pth").write_text("".join(f"{path}\n" for path in ours))
    # pip comes from the parent environment; --ignore-installed so that it never looks at (or uninstalls)
    # the parent's editable featcircuits, which it can see through the .pth file.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         cwd=root)
    return venv


@pytest.mark.slow
def test_wheel_install_finds_its_package_data_and_runs_the_demo(wheel_venv, tmp_path):
    venv = wheel_venv.resolve()
    probe = json.loads(_run([str(venv / "bin" / "python"), "-c", _PROBE], cwd=tmp_path).stdout.strip().splitlines()[-1])
    installed = Path(probe["file"]).resolve()
    assert venv in installed.parents and REPO_ROOT not in installed.parents, probe
    package = installed.parent
    assert Path(probe["registry"]) == package / "pretrained" / "registry.yaml"
    assert Path(probe["bundled"]) == package / "pretrained" / "bundled"
    assert {"bundled-transcoders", "bundled-resid-saes", "gpt2-small-res-jb"} <= set(probe["releases"])
    local_dir = Path(probe["local_dir"])  # relative in the registry: resolved beside the installed registry
    assert local_dir == package / "pretrained" / "bundled" / "transcoders" and local_dir.is_dir()

    out = tmp_path / "report"
    completed = _run([str(venv / "bin" / "featcircuits"), "demo", "--out", str(out), "--max-feature-nodes", "16",
                      "--max-pairs", "1", "--top", "2", "--no-progress"], cwd=tmp_path, timeout=180)
    printed = completed.stdout
    assert "with 4 dictionaries (transcoder, d_sae 1024)" in printed and "task 'docstring'" in printed, printed
    assert "faithfulness " in printed and "completeness " in printed
    report = Path(printed.split("report: ")[1].split()[0])
    assert report == (out / "report.html").resolve() and report.is_file()
    for name in ("graph.html", "circuit.html", "graph.json", "circuit.json", "dashboards.json"):
        assert (out / name).is_file(), name

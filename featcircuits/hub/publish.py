"""Publish dictionaries to the Hugging Face Hub: native + SAELens layouts, configs and a model card.

The folder to upload is built first (``build_upload_folder``; ``featcircuits push --dry-run`` stops
there), then sent through the real ``huggingface_hub`` client in a single commit, so the repo either
gets every file or none. The token is checked (present, and accepted by the Hub's whoami) before any
repo is created or any byte is uploaded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..dictionaries.base import Dictionary
from .model_card import render_model_card

__all__ = ["push_to_hub", "build_upload_folder", "HubAuthError", "NATIVE_DIR", "SAELENS_DIR"]

NATIVE_DIR = "native"
SAELENS_DIR = "saelens"
LOGIN_HELP = (
    "Log in with `hf auth login` (or the older `huggingface-cli login`), or set the HF_TOKEN environment "
    "variable, or pass token=... (--token)."
)

DictionarySource = str | Path | Sequence[Dictionary] | Mapping[str, Dictionary]


class HubAuthError(PermissionError):
    """No usable Hugging Face token; nothing was uploaded."""


def _name_for(dictionary: Dictionary, index: int) -> str:
    return (dictionary.cfg.hook_in or f"dictionary_{index}").replace("/", "_")


def _collect(source: DictionarySource) -> tuple[dict[str, Dictionary], dict[str, Any] | None, dict[str, Any] | None]:
    """(name -> dictionary, metrics.json, config.json) from a `featcircuits train --out` folder or objects."""
    from ..dictionaries.io import detect_format, load_dictionaries
    from ..dictionaries.io.common import read_json

    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"No dictionaries to publish at {folder}: the directory does not exist.")
        metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
        train_config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        try:
            detect_format(folder)
            named = {folder.name: load_dictionaries(folder)}
        except ValueError:
            named = {sub.name: load_dictionaries(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()
                     and _is_dictionary_dir(sub)}
        dictionaries = {}
        for name, loaded in named.items():
            for index, dictionary in enumerate(loaded):
                dictionaries[name if len(loaded) == 1 else f"{name}_{index}"] = dictionary
        if not dictionaries:
            raise ValueError(f"{folder} holds no dictionaries (expected sub-directories written by featcircuits train).")
        return dictionaries, metrics, train_config
    if isinstance(source, Mapping):
        return dict(source), None, None
    dictionaries: dict[str, Dictionary] = {}
    for index, dictionary in enumerate(source):
        name = _name_for(dictionary, index)
        dictionaries[name if name not in dictionaries else f"{name}_{index}"] = dictionary
    if not dictionaries:
        raise ValueError("push_to_hub was given no dictionaries.")
    return dictionaries, None, None


def _is_dictionary_dir(path: Path) -> bool:
    from ..dictionaries.io import detect_format

    try:
        detect_format(path)
        return True
    except ValueError:
        return False


def _default_base_model(dictionaries: Mapping[str, Dictionary]) -> str | None:
    """A Hub model id to name as base_model: the dictionaries' model when it looks like one (org/name)."""
    names = {d.cfg.model_name for d in dictionaries.values()}
    if len(names) == 1:
        (name,) = names
        if name.count("/") == 1 and not Path(name).exists():
            return name
    return None


def build_upload_folder(
    dictionaries: DictionarySource,
    out: str | Path,
    repo_id: str,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write exactly what :func:`push_to_hub` uploads into ``out`` (which must not exist or be empty).

    Layout: ``README.md`` (model card), ``native/<name>/`` (featcircuits), ``saelens/<name>/`` (SAELens
    ``cfg.json`` + ``sae_weights.safetensors``, for every dictionary sae-lens has an architecture for: not
    TopK/BatchTopK transcoders), and the run's ``metrics.json`` / ``config.json`` when known.
    """
    from .._version import __version__
    from ..dictionaries.io import FORMATS
    from ..dictionaries.io.common import write_json

    named, found_metrics, train_config = _collect(dictionaries)
    metrics = metrics if metrics is not None else found_metrics
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder for the upload so nothing in it is overwritten.")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for name, dictionary in named.items():
        FORMATS["native"].save([dictionary], out / NATIVE_DIR / name)
        files[name] = {"native": f"{NATIVE_DIR}/{name}"}
        try:
            FORMATS["saelens"].save([dictionary], out / SAELENS_DIR / name)
            files[name]["SAELens"] = f"{SAELENS_DIR}/{name}"
        except ValueError as err:  # e.g. TopK transcoders: sae-lens has no such architecture
            if "sae-lens has no architecture" not in str(err):
                raise
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    if train_config is not None:
        write_json(out / "config.json", train_config)
    card = render_model_card(repo_id, named, metrics, base_model or _default_base_model(named), __version__, files)
    (out / "README.md").write_text(card)
    return out


def _check_token(api: Any, token: str | None) -> str:
    """The token to use, verified by the Hub's whoami endpoint; raises HubAuthError before any upload."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise HubAuthError(f"No Hugging Face token found, so nothing was uploaded. {LOGIN_HELP}")
    try:
        api.whoami(token=token)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise HubAuthError(f"The Hub rejected the token ({status}), so nothing was uploaded. {LOGIN_HELP}") from None
        raise
    return token


def push_to_hub(
    dictionaries: DictionarySource,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    dry_run: str | Path | None = None,
) -> str:
    """Upload ``dictionaries`` (objects, or a ``featcircuits train --out`` folder) to ``repo_id``.

    With ``dry_run=DIR`` nothing is sent: the exact folder that would be uploaded is written to ``DIR``
    (works offline, needs no token) and its path is returned.

    Creates the repo if needed (``private``), the branch ``revision`` if it is new, and commits the
    folder :func:`build_upload_folder` writes in one commit. Returns the commit URL.

    Raises:
        HubAuthError: no token, or the Hub rejects it (nothing uploaded).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if dry_run is not None:
        return str(build_upload_folder(dictionaries, Path(dry_run), repo_id, metrics, base_model))
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to push to the Hub.")
    api = HfApi(endpoint=endpoint)
    token = _check_token(api, token)
    staging = Path(tempfile.mkdtemp(prefix="featcircuits-push-"))
    try:
        folder = build_upload_folder(dictionaries, staging / "upload", repo_id, metrics, base_model)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                      for p in files]
        count = len([n for n in (folder / NATIVE_DIR).iterdir()])
        commit = api.create_commit(
            repo_id, operations, token=token, revision=revision,
            commit_message=commit_message or f"featcircuits: upload {count} dictionar{'y' if count == 1 else 'ies'}",
        )
        return commit.commit_url
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe_folder(folder: Path) -> str:
    """One line per file of an upload folder, with sizes (for --dry-run)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return "\n".join(f"{p.relative_to(folder).as_posix()}  ({p.stat().st_size:,} bytes)" for p in files)


"""Load pretrained releases through huggingface_hub: its cache, revision pinning and offline mode.

Every file is fetched with ``hf_hub_download`` (so ``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE`` and
``revision=`` behave as everywhere else in the ecosystem) and read by the reader of the release's format.
Hub errors are translated into messages that name the repo, the revision, the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch

from ..dictionaries.base import Dictionary
from ..dictionaries.io import load_dictionaries as load_local_dictionaries
from .registry import REGISTRY_PATH, DictionaryEntry, Release, UnknownReleaseError, get_release

__all__ = ["load_dictionaries", "from_pretrained", "load_release", "hub_file", "HubFileError"]

# files of a folder-layout dictionary, by format
_FOLDER_FILES = {
    "native": ("cfg.json", "dictionary.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
}


class HubFileError(FileNotFoundError):
    """A release file could not be had: missing repo, revision or file, or not in the offline cache."""


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _explain_offline_miss(repo_id: str, filename: str, revision: str) -> str:
    """Why an offline lookup failed, from what the local cache (laid out by huggingface_hub) holds."""
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = _cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    fix = "Connect to the Hub once without HF_HUB_OFFLINE=1 to download it, or point HF_HUB_CACHE at a cache holding it."
    if not repo_dir.is_dir():
        return f"Repo {repo_id!r} is not in the local Hugging Face cache ({_cache_dir()}). {fix}"
    refs = sorted(p.name for p in (repo_dir / "refs").glob("*")) if (repo_dir / "refs").is_dir() else []
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
    commit = (repo_dir / "refs" / revision).read_text().strip() if (repo_dir / "refs" / revision).is_file() else revision
    if commit not in snapshots:
        return (
            f"Revision {revision!r} of repo {repo_id!r} does not exist in the local cache (cached refs: {refs or 'none'}; "
            f"cached commits: {[s[:12] for s in snapshots] or 'none'}). Check the revision name, or {fix[0].lower()}{fix[1:]}"
        )
    present = sorted(str(p.relative_to(repo_dir / "snapshots" / commit)) for p in (repo_dir / "snapshots" / commit).rglob("*")
                     if p.is_file())
    return (
        f"Repo {repo_id!r} at revision {revision!r} has no file {filename!r} in the local cache; the cached snapshot "
        f"holds {present[:12]}{' ...' if len(present) > 12 else ''}. The repo lacks the files this release expects, "
        f"or they were never downloaded. {fix}"
    )


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """Local path of ``filename`` in ``repo_id`` at ``revision`` (default: main), via the Hub cache.

    Raises:
        HubFileError: the repo, revision or file does not exist (online), or is not cached (offline).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown_revision = revision or "main"
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except RepositoryNotFoundError:
        raise HubFileError(
            f"Hub repo {repo_id!r} does not exist or is private/gated. Check the name; for a private or gated repo "
            "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN."
        ) from None
    except RevisionNotFoundError:
        raise HubFileError(
            f"Revision {shown_revision!r} does not exist in Hub repo {repo_id!r}; pass an existing branch, tag or commit."
        ) from None
    except LocalEntryNotFoundError as err:
        from huggingface_hub import constants

        reason = _explain_offline_miss(repo_id, filename, shown_revision)
        if not constants.HF_HUB_OFFLINE:  # online, but the Hub could not be reached
            reason = f"Could not reach the Hugging Face Hub ({err.__cause__ or err}). {reason}"
        raise HubFileError(reason) from None
    except EntryNotFoundError:
        raise HubFileError(
            f"Hub repo {repo_id!r} at revision {shown_revision!r} has no file {filename!r}: the repo lacks the files "
            "this release expects. Check the dictionary id, or the release's paths in its registry "
            "(featcircuits' own: featcircuits/pretrained/registry.yaml)."
        ) from None


def _split_location(release: Release, entry: DictionaryEntry, revision: str | None) -> tuple[str, str, str | None]:
    """``(repo_id, path, revision)`` of an entry; ``hf://org/repo/path?revision=r`` names another repo."""
    if entry.path.startswith("hf://"):
        parsed = urlparse(entry.path)
        repo_name, _, path = parsed.path.lstrip("/").partition("/")
        pinned = (parse_qs(parsed.query).get("revision") or [None])[0]
        return f"{parsed.netloc}/{repo_name}", path, revision or pinned
    return release.repo_id, entry.path, revision or release.revision


def _load_entry(release: Release, entry: DictionaryEntry, revision: str | None, device: str | torch.device) -> Dictionary:
    if release.local_dir is not None:  # shipped with the project: read in place
        if release.format not in _FOLDER_FILES:
            raise ValueError(f"Release {release.name!r}: local releases hold native or saelens folders.")
        dictionary = _load_folder(release.local_dir / entry.path, release.format, device)
        dictionary.cfg.extra.update({"release": release.name, "release_id": entry.id})
        return dictionary
    repo_id, path, pinned = _split_location(release, entry, revision)
    hook_in, hook_out = release.hooks_for(entry)
    provenance: dict[str, Any] = {"release": release.name, "release_id": entry.id, "repo_id": repo_id,
                                  "revision": pinned or "main", "published_metrics": dict(entry.metrics)}
    conversion = release.extra.get("conversion_func")
    if release.saelens_release and conversion:
        dictionary = _load_with_saelens(release, entry, pinned, device, provenance)
    elif release.format in _FOLDER_FILES:
        files = [hub_file(repo_id, f"{path}/{name}", pinned) for name in _FOLDER_FILES[release.format]]
        if release.format == "saelens":
            _optional_hub_file(repo_id, f"{path}/activation_scaler.json", pinned)
        dictionary = _load_folder(files[0].parent, release.format, device)
        dictionary.cfg.extra.update(provenance)
    elif release.format == "circuit-tracer" and release.kind == "cross_layer_transcoder":
        dictionary = _load_clt_folder(repo_id, path, pinned, device)
        dictionary.cfg.extra.update(provenance)
    elif release.format == "circuit-tracer":
        if not path.endswith(".npz"):
            raise ValueError(
                f"Release {release.name!r} dictionary {entry.id!r} is {path!r}; featcircuits reads circuit-tracer "
                "transcoder sets of Gemma Scope params.npz files here. Download the folder and load it as a path."
            )
        from .readers import dictionary_from_gemma_scope_npz

        dictionary = dictionary_from_gemma_scope_npz(
            hub_file(repo_id, path, pinned), hook_in, hook_out, entry.layer, release.model, device, **provenance
        )
    elif release.format == "transcoder-circuits-pt":
        from .readers import dictionary_from_transcoder_circuits_pt

        dictionary = dictionary_from_transcoder_circuits_pt(
            hub_file(repo_id, path, pinned), hook_in, hook_out, entry.layer, release.model, device, **provenance
        )
    else:  # registry.py validates formats; this is a guard for hand-built Release objects
        raise ValueError(f"Release {release.name!r} has format {release.format!r}, which featcircuits cannot read.")
    cfg = dictionary.cfg
    cfg.model_name = cfg.model_name or release.model
    if cfg.layer is None and cfg.kind != "cross_layer_transcoder":  # a CLT spans every layer
        cfg.layer = entry.layer
    if release.extra.get("config_overrides"):
        cfg.extra.setdefault("config_overrides", release.extra["config_overrides"])
    return dictionary


def _optional_hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    try:
        return hub_file(repo_id, filename, revision)
    except HubFileError:
        return None


def _load_clt_folder(repo_id: str, path: str, revision: str | None, device: str | torch.device) -> Dictionary:
    """A circuit-tracer cross-layer transcoder in folder ``path`` of a Hub repo (``""`` or ``"."``: its root).

    ``W_dec_0`` writes to every layer, so its shape gives the layer count; each layer's two files are then fetched
    (through the Hub cache, so offline mode and revisions behave as for every other file) and read by the
    circuit-tracer format reader, which names any file that is missing.
    """
    from safetensors import safe_open

    from ..dictionaries.io import FORMATS

    prefix = f"{path.strip('/')}/" if path.strip("/.") else ""
    config = hub_file(repo_id, f"{prefix}config.yaml", revision)
    first = hub_file(repo_id, f"{prefix}W_dec_0.safetensors", revision)
    try:
        with safe_open(str(first), framework="pt") as handle:
            n_layers = int(handle.get_slice("W_dec_0").get_shape()[1])
    except Exception as err:  # a truncated download, or another layout
        raise ValueError(f"{first} (W_dec_0 of {repo_id}) is not a circuit-tracer CLT decoder ({err}).") from None
    for layer in range(n_layers):
        for name in (f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"):
            hub_file(repo_id, f"{prefix}{name}", revision)
    (clt,) = FORMATS["circuit_tracer"].load(config.parent, device=device)
    return clt


def _load_folder(folder: Path, fmt: str, device: str | torch.device) -> Dictionary:
    """A downloaded native or SAELens folder, read by featcircuits' own format readers; SAELens folders
    written before sae-lens 6 are first brought to the current layout by sae-lens's own config upgrade."""
    from ..dictionaries.io import FORMATS

    try:
        return FORMATS[fmt].load(folder, device=device)[0]
    except ValueError as err:
        if fmt != "saelens" or "load it with sae-lens >= 6" not in str(err):
            raise
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting, sae_lens_disk_loader

    from .readers import dictionary_from_saelens_components

    cfg_dict, state_dict = sae_lens_disk_loader(folder, device="cpu")
    return dictionary_from_saelens_components(handle_config_defaulting(cfg_dict), state_dict, str(folder), device)


def _load_with_saelens(release: Release, entry: DictionaryEntry, revision: str | None,
                       device: str | torch.device, provenance: dict[str, Any]) -> Dictionary:
    """Releases whose files need one of sae-lens's conversion functions (Gemma Scope npz, llama-scope, ...)."""
    from sae_lens.loading.pretrained_sae_loaders import (
        NAMED_PRETRAINED_SAE_LOADERS,
        handle_config_defaulting,
    )
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides

    from .readers import dictionary_from_saelens_components

    assert release.saelens_release is not None  # _load_entry sends only sae-lens releases here
    overrides = dict(get_config_overrides(release.saelens_release, entry.id))
    if revision:
        overrides["revision"] = revision  # honoured by the sae-lens loaders that take a revision
    loader = NAMED_PRETRAINED_SAE_LOADERS[release.extra["conversion_func"]]
    cfg_dict, state_dict, _ = loader(release.repo_id, entry.path, device="cpu", force_download=False,
                                     cfg_overrides=overrides)
    cfg_dict = handle_config_defaulting(cfg_dict)
    return dictionary_from_saelens_components(cfg_dict, state_dict, f"{release.repo_id}/{entry.path}", device,
                                              **provenance)


def from_pretrained(release: str, dictionary_id: str | int, revision: str | None = None,
                    device: str | torch.device = "cpu", registry: str | Path = REGISTRY_PATH) -> Dictionary:
    """One dictionary of a registered release (featcircuits' registry or any SAELens release id).

    Args:
        release: release name, e.g. ``"gpt2-small-res-jb"``.
        dictionary_id: its id in the release (e.g. ``"blocks.8.hook_resid_pre"``) or a layer number.
        revision: branch, tag or commit to pin (default: the release's pin, else ``main``).
        registry: the registry file (default: featcircuits' own, ``featcircuits/pretrained/registry.yaml``).
    """
    spec = get_release(release, registry)
    return _load_entry(spec, spec.entry(dictionary_id), revision, device)


def load_release(release: str, ids: list[str] | None = None, revision: str | None = None,
                 device: str | torch.device = "cpu", registry: str | Path = REGISTRY_PATH) -> list[Dictionary]:
    """Every dictionary of a release (or those in ``ids``), in registry order."""
    spec = get_release(release, registry)
    entries = [spec.entry(i) for i in ids] if ids is not None else list(spec.dictionaries.values())
    return [_load_entry(spec, entry, revision, device) for entry in entries]


def load_dictionaries(source: str | Path, ids: list[str] | None = None, *, revision: str | None = None,
                      device: str | torch.device = "cpu", format: str | None = None,
                      registry: str | Path = REGISTRY_PATH) -> list[Dictionary]:
    """The one way to load dictionaries: from local files or from a pretrained release.

    Args:
        source: a local path (one dictionary directory or file in any supported format: native, SAELens,
            sparsify, circuit-tracer; a directory of them; or a directory of ``featcircuits train --out``
            runs), or a release name from the registry or SAELens (e.g. ``"gpt2-small-res-jb"``), fetched
            through the Hugging Face Hub cache.
        ids: a release's dictionaries to load (default: all); not used for local paths.
        revision: a release's branch, tag or commit (default: the release's pin, else ``main``).
        device: where the weights go.
        format: force a local format instead of detecting it.
        registry: the registry file releases are looked up in.

    Returns the dictionaries, in the order of the directory's sorted entries for local paths and in registry
    order for releases.
    """
    path = Path(source)
    if path.exists() or not isinstance(source, str) or "/" in source or source.startswith((".", "~")):
        if ids is not None:
            raise ValueError(f"ids={ids} selects dictionaries of a release; {source} is a local path, loaded "
                             "whole. Point at the one dictionary's directory instead.")
        return load_local_dictionaries(path, device=device, format=format)
    try:
        return load_release(source, ids=ids, revision=revision, device=device, registry=registry)
    except UnknownReleaseError as err:
        raise FileNotFoundError(f"No dictionary at {source}: the path does not exist, nor is it a release. {err}") from None

"""The pretrained registry: release name -> Hub repo, model, hooks, format, per-dictionary paths and metrics.

featcircuits' own entries live in ``featcircuits/pretrained/registry.yaml`` (package data, found with
``importlib.resources``; a ``local_dir`` there is relative to that folder). A release that names
``saelens_release``, and any release id that only sae-lens knows, is resolved through sae-lens's own registry
(``sae_lens/pretrained_saes.yaml``) at run time, so its ids, paths and metrics are never copied here.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._resources import pretrained_path

__all__ = [
    "REGISTRY_PATH",
    "FORMATS",
    "DictionaryEntry",
    "Release",
    "get_release",
    "list_releases",
    "UnknownReleaseError",
]

REGISTRY_PATH = pretrained_path("registry.yaml")
FORMATS = ("native", "saelens", "circuit-tracer", "transcoder-circuits-pt")


class UnknownReleaseError(KeyError):
    """An unknown release or dictionary id; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DictionaryEntry:
    """One dictionary of a release: its id, where its files are, and its published metrics."""

    id: str
    path: str  # folder or file in the release repo, or an "hf://org/repo/file[?revision=r]" URI
    layer: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Release:
    name: str
    repo_id: str
    model: str
    format: str
    kind: str = "sae"
    hook_in: str = ""  # may contain "{layer}"
    hook_out: str = ""
    revision: str | None = None
    activation: str | None = None
    saelens_release: str | None = None
    local_dir: Path | None = None  # files shipped with the registry (relative to its folder), no Hub involved
    description: str = ""
    dictionaries: dict[str, DictionaryEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def entry(self, dictionary_id: str | int) -> DictionaryEntry:
        """The entry for ``dictionary_id`` (an id, or a layer number); unknown ids list close matches."""
        key = str(dictionary_id)
        if key in self.dictionaries:
            return self.dictionaries[key]
        by_layer = [e for e in self.dictionaries.values() if e.layer is not None and str(e.layer) == key]
        if len(by_layer) == 1:
            return by_layer[0]
        ids = list(self.dictionaries)
        close = difflib.get_close_matches(key, ids, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
        raise UnknownReleaseError(
            f"Release {self.name!r} has no dictionary {key!r}.{hint} Its ids: {shown}."
        )

    def hooks_for(self, entry: DictionaryEntry) -> tuple[str, str]:
        """``(hook_in, hook_out)`` of one dictionary, with ``{layer}`` filled."""
        layer = "" if entry.layer is None else entry.layer
        hook_in = self.hook_in.format(layer=layer) if self.hook_in else ""
        hook_out = self.hook_out.format(layer=layer) if self.hook_out else hook_in
        return hook_in, hook_out


@functools.cache
def _read_registry(path: str) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    releases = data.get("releases")
    if not isinstance(releases, dict):
        raise ValueError(f"{path} has no 'releases' mapping; it is not a featcircuits registry.")
    return releases


def _entries_from_yaml(name: str, spec: dict[str, Any]) -> dict[str, DictionaryEntry]:
    entries: dict[str, DictionaryEntry] = {}
    if "path_template" in spec:
        for layer in spec["layers"]:
            dictionary_id = spec.get("id_template", "layer_{layer}").format(layer=layer)
            entries[dictionary_id] = DictionaryEntry(dictionary_id, spec["path_template"].format(layer=layer), layer)
    for item in spec.get("dictionaries") or []:
        entries[str(item["id"])] = DictionaryEntry(
            str(item["id"]), str(item["path"]), item.get("layer"), dict(item.get("metrics") or {})
        )
    if not entries and not spec.get("saelens_release"):
        raise ValueError(f"Registry release {name!r} lists no dictionaries (need 'dictionaries' or 'path_template').")
    return entries


@dataclass(frozen=True)
class SaelensRelease:
    """One release of sae-lens's own registry, as its pretrained_saes.yaml states it."""

    repo_id: str
    model: str
    conversion_func: str | None
    saes: list[dict[str, Any]]
    config_overrides: dict[str, Any] | None


@functools.cache
def _saelens_directory() -> dict[str, SaelensRelease]:
    """sae-lens's pretrained_saes.yaml, read in place (importing sae_lens itself takes seconds)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    with path.open() as handle:
        data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {
        name: SaelensRelease(value["repo_id"], value["model"], value.get("conversion_func"),
                             list(value.get("saes") or []), value.get("config_overrides"))
        for name, value in data.items()
    }


def _layer_from(text: str) -> int | None:
    import re

    match = re.search(r"(?:blocks\.|layer_|layers\.)(\d+)", text)
    return int(match.group(1)) if match else None


def _saelens_entries(saelens_release: str) -> tuple[SaelensRelease, dict[str, DictionaryEntry]]:
    lookup = _saelens_directory()[saelens_release]
    entries = {}
    for item in lookup.saes:
        sae_id, path = str(item["id"]), str(item["path"])
        metrics = {key: float(item[key]) for key in ("l0", "variance_explained") if item.get(key) is not None}
        layer = _layer_from(sae_id)
        entries[sae_id] = DictionaryEntry(sae_id, path, layer if layer is not None else _layer_from(path), metrics)
    return lookup, entries


def _saelens_extra(saelens_release: str) -> dict[str, Any]:
    lookup = _saelens_directory()[saelens_release]
    return {"conversion_func": lookup.conversion_func, "config_overrides": lookup.config_overrides}


def _release_from_yaml(name: str, spec: dict[str, Any], registry: Path) -> Release:
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"Registry release {name!r} has format {fmt!r}; expected one of {FORMATS}.")
    if not spec.get("repo_id") and not spec.get("local_dir"):
        raise ValueError(f"Registry release {name!r} names neither a repo_id nor a local_dir.")
    entries = _entries_from_yaml(name, spec)
    saelens_release = spec.get("saelens_release")
    if saelens_release:
        lookup, entries = _saelens_entries(saelens_release)
        if lookup.repo_id != spec["repo_id"]:
            raise ValueError(
                f"Registry release {name!r} names repo {spec['repo_id']!r} but sae-lens's {saelens_release!r} "
                f"now points at {lookup.repo_id!r}; update {registry}."
            )
    hooks = spec.get("hooks") or {}
    extra = _saelens_extra(saelens_release) if saelens_release else {}
    known = {"repo_id", "model", "format", "kind", "hooks", "revision", "activation", "saelens_release", "local_dir",
             "description", "dictionaries", "path_template", "layers", "id_template"}
    return Release(
        name=name,
        repo_id=spec.get("repo_id", ""),
        local_dir=(registry.parent / spec["local_dir"]) if spec.get("local_dir") else None,
        model=spec["model"],
        format=fmt,
        kind=spec.get("kind", "sae"),
        hook_in=hooks.get("in", ""),
        hook_out=hooks.get("out", ""),
        revision=spec.get("revision"),
        activation=spec.get("activation"),
        saelens_release=saelens_release,
        description=spec.get("description", ""),
        dictionaries=entries,
        extra={**extra, **{k: v for k, v in spec.items() if k not in known}},
    )


def _release_from_saelens(name: str) -> Release:
    lookup, entries = _saelens_entries(name)
    return Release(
        name=name,
        repo_id=lookup.repo_id,
        model=lookup.model,
        format="saelens",
        kind="transcoder" if "transcoder" in name else "sae",
        saelens_release=name,
        description=f"SAELens release {name!r} (from sae-lens's pretrained_saes.yaml).",
        dictionaries=entries,
        extra=_saelens_extra(name),
    )


def list_releases(include_saelens: bool = True, registry: str | Path = REGISTRY_PATH) -> list[str]:
    """Names of featcircuits' releases, then (optionally) every release sae-lens registers."""
    names = list(_read_registry(str(registry)))
    if include_saelens:
        names += [name for name in _saelens_directory() if name not in names]
    return names


def get_release(name: str, registry: str | Path = REGISTRY_PATH) -> Release:
    """The release called ``name``: featcircuits' registry first, then sae-lens's.

    Raises:
        UnknownReleaseError: neither registry knows ``name``; the message lists close matches.
    """
    ours = _read_registry(str(registry))
    if name in ours:
        return _release_from_yaml(name, ours[name], Path(registry))
    if name in _saelens_directory():
        return _release_from_saelens(name)
    candidates = list_releases(registry=registry)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownReleaseError(
        f"Unknown pretrained release {name!r}.{hint} featcircuits' releases: {', '.join(ours)} "
        f"(see {registry}); any SAELens release id also works. To load a local folder, pass "
        "its path instead."
    )

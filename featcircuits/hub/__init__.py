"""Pretrained releases on the Hugging Face Hub: the registry, loading through huggingface_hub, publishing."""

from .checks import check_dictionaries_match_model
from .loading import from_pretrained, load_release
from .registry import Release, get_release, list_releases

__all__ = [
    "check_dictionaries_match_model",
    "from_pretrained",
    "load_release",
    "Release",
    "get_release",
    "list_releases",
    "push_to_hub",
]


def __getattr__(name: str):
    if name == "push_to_hub":  # publishing imports huggingface_hub's upload machinery; only on demand
        from .publish import push_to_hub

        return push_to_hub
    raise AttributeError(f"module 'featcircuits.hub' has no attribute {name!r}")

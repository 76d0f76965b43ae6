"""featcircuits' package data (``featcircuits/pretrained/``: the registry and the bundled model), found
through ``importlib.resources`` so that a wheel install finds it as well as a checkout does."""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

__all__ = ["pretrained_path"]

_extracted = contextlib.ExitStack()  # files extracted from a zipped install live until the process exits
atexit.register(_extracted.close)


def pretrained_path(*parts: str) -> Path:
    """A real filesystem path to ``featcircuits/pretrained/<parts>`` (it need not exist).

    Installed packages (wheel, editable, checkout) are plain directories, and the path points into them;
    from a zipped install the resource is extracted (``importlib.resources.as_file``) for the process's life.
    """
    resource = resources.files("featcircuits") / "pretrained"
    for part in parts:
        resource = resource / part
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))

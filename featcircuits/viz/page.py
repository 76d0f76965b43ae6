"""Assemble one self-contained HTML page: the viewer's CSS and JavaScript inline, the data as inline JSON.

The same script draws graph pages and dashboard pages; ``payload["mode"]`` says which. Nothing is
fetched at view time, so a page works offline and can be mailed or attached as it is.
"""

from __future__ import annotations

import html
import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from featcircuits.dictionaries.io.common import atomic_path

__all__ = ["build_page", "write_page", "json_for_script", "make_readable"]


def make_readable(path: Path) -> None:
    """Give a freshly written temporary file the usual permissions (it is created private, 0600): pages
    and pictures are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@cache
def _asset(name: str) -> str:
    return resources.files("featcircuits.viz").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def json_for_script(data: Any) -> str:
    """JSON safe to place inside a ``<script>`` element.

    ``ensure_ascii`` escapes every non-ASCII character (U+2028 included); escaping ``<``, ``>`` and ``&``
    as ``\\u003c``... means no token string, however hostile, can close the script element.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(payload: dict[str, Any], title: str) -> str:
    """The whole HTML document for ``payload`` (a graph or dashboard payload)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_asset('viewer.css')}\n</style>\n</head>\n"
        "<body>\n<div id=\"fc-app\"></div>\n"
        f"<script type=\"application/json\" id=\"fc-data\">{json_for_script(payload)}</script>\n"
        f"<script>\n{_asset('viewer.js')}\n</script>\n</body>\n</html>\n"
    )


def write_page(payload: dict[str, Any], path: str | Path, title: str) -> Path:
    """Write the page atomically (a crash leaves any earlier file intact) and return its path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(build_page(payload, title), encoding="utf-8")
        make_readable(tmp)
    return path

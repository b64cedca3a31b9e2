"""The operator's page: one static HTML file (inline CSS and JS, SVG charts drawn by hand, no asset from the
internet), served as ``GET /`` by :mod:`gateway.http`; it polls ``/api/v1/...``.

>>> b"<title>" in index_html()
True
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["index_html"]


def index_html() -> bytes:
    return files(__package__).joinpath("index.html").read_bytes()

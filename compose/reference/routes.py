"""The route list of docs/api.md, from the one route table (`ingress/routes.py`)."""

from __future__ import annotations

import inspect

from compose.reference.common import require, table


def routes_markdown() -> str:
    """The route table of `ingress/routes.py`: method, path, what it requires, and the first
    line of its handler's docstring."""
    from ingress.routes import ROUTES

    rows = []
    for endpoint in ROUTES:
        doc = inspect.getdoc(endpoint.handler)
        require(bool(doc), f"handler {endpoint.handler.__module__}."
                 f"{endpoint.handler.__name__} has no docstring: its first line is the "
                 "route's description in docs/api.md")
        summary = " ".join((doc or "").split("\n\n")[0].split())
        rows.append((f"`{endpoint.method} {endpoint.path}`", endpoint.access.value, summary))
    return "\n".join(table(("route", "requires", "what"), rows)) + "\n"

"""The route list of docs/api.md, from the one route table (`ingress/routes.py`)."""

from __future__ import annotations

import inspect

from compose.reference.common import require, table


def routes_markdown() -> str:
    """The route table of `ingress/routes.py`: method, path, the permission it requires, and
    the first line of its handler's docstring."""
    from ingress.routes import ROUTES

    rows = []
    for endpoint in ROUTES:
        doc = inspect.getdoc(endpoint.handler)
        require(bool(doc), f"handler {endpoint.handler.__module__}."
                 f"{endpoint.handler.__name__} has no docstring: its first line is the "
                 "route's description in docs/api.md")
        summary = " ".join((doc or "").split("\n\n")[0].split())
        needs = "public" if endpoint.permission is None else f"`{endpoint.permission.value}`"
        rows.append((f"`{endpoint.method} {endpoint.path}`", needs, summary))
    return "\n".join(table(("route", "requires", "what"), rows)) + "\n"


def roles_markdown() -> str:
    """Which role holds which permission (`topics/identity.py`)."""
    from topics.identity import ROLE_PERMISSIONS, Permission, Role

    rows = [(f"`{p.value}`", *("yes" if p in ROLE_PERMISSIONS[r] else "" for r in Role))
            for p in Permission]
    return "\n".join(table(("permission", *(f"`{r.value}`" for r in Role)), rows)) + "\n"

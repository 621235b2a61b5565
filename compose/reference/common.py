"""What the reference generators share: where things are, the one error, Markdown tables."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("topics", "state", "ingress", "workers")
DOCS = ROOT / "docs"


class ReferenceProblem(Exception):
    """The code and its documentation disagree in a way only a person can settle."""


def require(condition: bool, problem: str) -> None:
    if not condition:
        raise ReferenceProblem(problem)


def table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def cell(text: str) -> str:
    """Table-safe: a pipe would end the cell (escaped even in code spans, as GFM wants), and
    `<word` outside a code span would open an HTML tag."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part) if i % 2 == 0 else part
                    for i, part in enumerate(parts))

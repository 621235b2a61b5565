"""Which generated block of docs/ comes from where, and the command that rewrites or checks
them: `python -m compose.reference [--check]` (`make docs`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import compose.reference as package
from compose.reference.common import DOCS, ReferenceProblem, require
from compose.reference.configuration import configuration_markdown
from compose.reference.error_codes import (
    error_classes_markdown,
    errors_markdown,
    provider_errors_markdown,
)
from compose.reference.metrics import metrics_markdown
from compose.reference.routes import roles_markdown, routes_markdown

BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "routes": ("api.md", routes_markdown),
    "roles": ("tenancy.md", roles_markdown),
    "configuration": ("configuration.md", configuration_markdown),
    "error-classes": ("errors.md", error_classes_markdown),
    "provider-errors": ("errors.md", provider_errors_markdown),
    "errors": ("errors.md", errors_markdown),
    "metrics": ("operations.md", metrics_markdown),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:"
                      rf"{re.escape(name)} -->)", re.DOTALL)


def render(text: str, name: str, content: str) -> str:
    """`text` with block `name` holding `content` (a blank line either side, for Markdown).
    Fails when the document has no such block or more than one."""
    pattern = _pattern(name)
    require(len(pattern.findall(text)) == 1,
             f"expected one '<!-- generated:{name} -->' … '<!-- /generated:{name} -->' block")
    return pattern.sub(lambda m: f"{m[1]}\n{content}\n{m[3]}", text)


def regenerate(docs: Path = DOCS, blocks: Mapping[str, tuple[str, Callable[[], str]]] = BLOCKS
               ) -> dict[Path, tuple[str, str, list[str]]]:
    """For each document: (committed text, generated text, names of the blocks that differ)."""
    result: dict[Path, tuple[str, str, list[str]]] = {}
    for name, (document, produce) in blocks.items():
        path = docs / document
        if path not in result:
            text = path.read_text()
            result[path] = (text, text, [])
        old, new, stale = result[path]
        updated = render(new, name, produce())
        result[path] = (old, updated, [*stale, name] if updated != new else stale)
    return result


def stale_blocks(docs: Path = DOCS,
                 blocks: Mapping[str, tuple[str, Callable[[], str]]] = BLOCKS) -> list[str]:
    """`document: block` for every committed block that differs from what the code prints."""
    return _names(docs, regenerate(docs, blocks))


def _names(docs: Path, results: Mapping[Path, tuple[str, str, list[str]]]) -> list[str]:
    return [f"{path.relative_to(docs.parent).as_posix()}: {name}"
            for path, (_old, _new, stale) in results.items() for name in stale]


def main(argv: list[str] | None = None, docs: Path = DOCS) -> int:
    """Rewrite (or, with --check, compare) every block; 0 when all is well, 1 when --check
    found blocks that differ, 2 when the code and the generator's lists disagree."""
    parser = argparse.ArgumentParser(prog="python -m compose.reference",
                                     description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 listing the blocks that differ")
    args = parser.parse_args(argv)
    try:
        results = regenerate(docs)
    except ReferenceProblem as exc:
        print(f"compose.reference: {exc}", file=sys.stderr)
        return 2
    stale = _names(docs, results)
    if args.check:
        for line in stale:
            print(f"out of date: {line} (run `make docs`)", file=sys.stderr)
        return 1 if stale else 0
    for path, (old, new, _) in results.items():
        if new != old:
            path.write_text(new)
    for line in stale:
        print(f"rewrote {line}")
    return 0

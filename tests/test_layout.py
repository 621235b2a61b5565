"""House rules of the layout (/work/shared/DESIGN.md, "Layout") that import-linter cannot
check: a feature that spans layers keeps one name across them, and each of its files'
docstrings names the others. (The import rules themselves are contracts in pyproject.toml,
checked by `lint-imports` in `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each file's docstring names these counterparts (its feature's other files, or the files
# that use it).
COUNTERPARTS = {
    "topics/bandit.py": ("state/bandit.py", "workers/router/decide.py"),
    "state/bandit.py": ("topics/bandit.py", "workers/router/decide.py"),
    "workers/router/decide.py": ("topics/bandit.py", "state/bandit.py",
                                 "topics/routing_policy.py", "state/routing_policy.py"),
    "topics/routing_policy.py": ("state/routing_policy.py", "ingress/routing_policy.py",
                                 "workers/router/decide.py"),
    "state/routing_policy.py": ("topics/routing_policy.py", "ingress/routing_policy.py",
                                "workers/router/decide.py"),
    "state/vault.py": ("ingress/vault.py", "workers/router/routes.py"),
    "workers/router/routes.py": ("state/vault.py", "ingress/vault.py"),
    "state/breakers.py": ("workers/router/decide.py", "workers/router/attempt.py",
                          "ingress/insights.py"),
    "workers/router/attempt.py": ("state/breakers.py",),
    "state/claims.py": ("workers/router/worker.py", "workers/router/cancel.py",
                        "ingress/pipeline.py"),
    "workers/router/worker.py": ("state/claims.py",),
    "workers/router/cancel.py": ("state/claims.py",),
    "state/usage.py": ("topics/messages.py", "workers/usage/"),
    "workers/usage/__init__.py": ("topics/messages.py", "state/usage.py"),
    "workers/usage/main.py": ("state/usage.py",),
    "state/keys.py": ("ingress/auth.py",),
    "topics/audit.py": ("state/audit.py", "ingress/audit.py", "workers/audit/"),
    "state/audit.py": ("topics/audit.py", "ingress/audit.py", "workers/audit/", "compose/cli.py"),
    "ingress/audit.py": ("topics/audit.py", "state/audit.py", "workers/audit/"),
    "workers/audit/__init__.py": ("topics/audit.py", "state/audit.py"),
    "workers/audit/main.py": ("state/audit.py",),
    "topics/errors.py": ("workers/providers/errors.py", "ingress/errors.py"),
    "workers/providers/errors.py": ("topics/errors.py", "ingress/errors.py"),
    "ingress/routing_policy.py": ("topics/routing_policy.py", "state/routing_policy.py"),
    "ingress/vault.py": ("state/vault.py", "workers/router/routes.py"),
    "ingress/routes.py": ("ingress/call.py",),
    "ingress/call.py": ("ingress/routes.py", "ingress/services.py"),
    "ingress/services.py": ("ingress/app.py", "state/runtime.py", "ingress/call.py"),
    "state/runtime.py": ("ingress/app.py", "workers/router/main.py", "workers/usage/main.py",
                         "workers/audit/main.py", "workers/classifier/main.py"),
}


def _docstring(path: str) -> str:
    return ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""


def _singular(name: str) -> str:
    return name[:-3] + "y" if name.endswith("ies") else name.removesuffix("s")


def test_a_feature_keeps_one_name_across_layers() -> None:
    # e.g. topics/routing_policy.py beside a state/routing_policies.py.
    names: dict[str, set[str]] = {}
    for layer in ("topics", "state", "ingress", "workers"):
        for module in (ROOT / layer).rglob("*.py"):
            if module == ROOT / layer / "__init__.py":  # the layer itself
                continue
            name = module.parent.name if module.name == "__init__.py" else module.stem
            names.setdefault(_singular(name), set()).add(name)
    assert [spellings for spellings in names.values() if len(spellings) > 1] == []


@pytest.mark.parametrize(("path", "named"), COUNTERPARTS.items())
def test_docstrings_name_their_counterparts(path: str, named: tuple[str, ...]) -> None:
    doc = _docstring(path)
    for other in named:
        assert (ROOT / other).exists(), f"{path} names {other}, which does not exist"
        assert other in doc, f"the docstring of {path} does not name {other}"

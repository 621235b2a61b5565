"""Where the tests find the checking tools compose/bootstrap.sh installs (prometheus,
promtool): the repo-local .tools/bin first, then PATH. Missing under CI (CI=true) is a
failure, since the bootstrap ran there; locally it is a skip that says how to get them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = ROOT / ".tools" / "bin"


def local_tool(name: str) -> str:
    """The path of tool `name`; fails (CI) or skips (locally) when it is not installed."""
    candidate = TOOLS_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is not None:
        return found
    why = (f"{name} not found in {TOOLS_BIN} nor on PATH: run `make bootstrap` "
           "(compose/bootstrap.sh installs it)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)

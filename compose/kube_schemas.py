"""Kubernetes JSON schemas for kubeconform, offline: `python -m compose.kube_schemas` (run by
compose/bootstrap.sh) writes them into ~/.cache/switchyard once.

kubeconform fetches its schemas from GitHub by default, which a machine that reaches only
package registries cannot. The PyPI package `kubernetes-validate` ships the same schemas,
generated from Kubernetes' OpenAPI spec, per Kubernetes release, in a strict form (no
property outside the spec). They reference their shared definitions by an absolute `$id`
(`https://kubernetes.io/api/_definitions.json`), which kubeconform would try to download; this
rewrites each reference to the sibling file `_definitions.json`, so they resolve on disk.
tests/test_helm.py validates the chart's rendered objects against them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

# The package's version is the newest Kubernetes release it carries schemas for.
PACKAGE_VERSION = "1.37.0"
KUBERNETES_VERSION = "1.37.0"
_FLAVOUR = f"v{KUBERNETES_VERSION}-local-strict"
_DEFINITIONS = "/api/_definitions.json"


def schema_dir() -> Path:
    """Where the schemas live: one `<kind>-<group>-<version>.json` per type."""
    return Path.home() / ".cache/switchyard/kubernetes-json-schema" / _FLAVOUR


def schema_location() -> str:
    """kubeconform's `-schema-location` template for `schema_dir()`."""
    return str(schema_dir() / "{{ .ResourceKind }}{{ .KindSuffix }}.json")


def _local_refs(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_DEFINITIONS):
                node[key] = value.removeprefix("/api/")
            else:
                _local_refs(value)
    elif isinstance(node, list):
        for value in node:
            _local_refs(value)


def install(dest: Path) -> None:
    """Download the package with pip and write its rewritten schemas into `dest`."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "-d", tmp, f"kubernetes-validate=={PACKAGE_VERSION}"], check=True)
        (wheel,) = Path(tmp).glob("kubernetes_validate-*.whl")
        prefix = f"kubernetes_validate/kubernetes-json-schema/{_FLAVOUR}/"
        # Written beside dest and renamed: an interrupted run never looks complete.
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp.", dir=dest.parent))
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".json")]
                if not names:
                    raise SystemExit(f"kubernetes-validate {PACKAGE_VERSION} has no {_FLAVOUR}")
                for name in names:
                    doc = json.loads(zf.read(name))
                    doc.pop("$id", None)
                    _local_refs(doc)
                    (staging / name.removeprefix(prefix)).write_text(json.dumps(doc))
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def main() -> None:
    dest = schema_dir()
    if (dest / "deployment-apps-v1.json").is_file():
        return
    print(f"bootstrap: Kubernetes {KUBERNETES_VERSION} JSON schemas (PyPI kubernetes-validate) "
          f"into {dest}")
    install(dest)


if __name__ == "__main__":
    main()

"""The peer gateway for bench.compare: LiteLLM proxy, installed from PyPI into its own virtual
environment (never ours), configured with one model routed to our fake upstream, no database,
logging off.

    with LiteLLM(fake_url, log_dir) as peer:   # peer.url, peer.pid, peer.headers
        ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compose.children import Children, wait_http
from compose.stack import free_port

# The newest litellm[proxy] whose pinned dependencies PyPI serves here: 1.110.x needs
# `litellm-proxy`, 1.108.1–1.109.x a `litellm-proxy-extras` (0.4.110.post1+), neither published.
LITELLM_VERSION = "1.108.0"
VENV = Path.home() / ".cache/switchyard/litellm-venv"
MODEL = "gpt-4o-mini"
MASTER_KEY = "sk-switchyard-bench"  # fixed: no database, so no virtual keys

Log = Callable[[str], object]


@dataclass(frozen=True)
class Install:
    version: str
    seconds: float | None  # None: already installed, nothing done


def installed_version(venv: Path = VENV) -> str | None:
    python = venv / "bin/python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def ensure_installed(version: str = LITELLM_VERSION, venv: Path = VENV,
                     log: Log = print) -> Install:
    """Create `venv` with `litellm[proxy]==version` unless it is already there."""
    if installed_version(venv) == version and (venv / "bin/litellm").exists():
        return Install(version, None)
    log(f"peer: installing litellm[proxy]=={version} into {venv} (from PyPI)")
    started = time.monotonic()
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Python 3.11 like ours; `sys.executable` is our venv's, so build from its base.
    base = Path(sys.base_prefix) / "bin/python3"
    subprocess.run([str(base), "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                    f"litellm[proxy]=={version}"], check=True)
    seconds = time.monotonic() - started
    log(f"peer: litellm {version} installed in {seconds:.0f} s")
    return Install(version, seconds)


def config_yaml(fake_url: str) -> str:
    """One model on the fake upstream; nothing that logs, stores or calls home."""
    return f"""\
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {fake_url}/v1
      api_key: fake
litellm_settings:
  set_verbose: false
  json_logs: false
  turn_off_message_logging: true
  telemetry: false
  request_timeout: 60
  num_retries: 0
general_settings:
  master_key: {MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
"""


# Environment of the proxy: errors only, the bundled model cost map (no fetch from GitHub),
# no .env loading, no telemetry.
ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_SCHEMA_UPDATE": "True",
}


class LiteLLM(Children):
    """LiteLLM proxy as a child process on a free loopback port."""

    def __init__(self, fake_url: str, log_dir: Path, *, workers: int = 1,
                 venv: Path = VENV, log: Log = print) -> None:
        self.port = free_port()
        self._fake_url = fake_url
        self._log_dir = log_dir
        self._workers = workers
        self._venv = venv
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("LiteLLM is not running")
        return self._proc.pid

    def start(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        config = self._log_dir / "litellm-config.yaml"
        config.write_text(config_yaml(self._fake_url))
        # No DATABASE_URL anywhere in its environment: LiteLLM then runs without a database.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DATABASE_URL", "LITELLM_", "OPENAI_"))} | ENV
        argv = [str(self._venv / "bin/litellm"), "--config", str(config), "--host",
                "127.0.0.1", "--port", str(self.port), "--num_workers", str(self._workers)]
        log_file = self._log_dir / "litellm.log"
        with log_file.open("ab") as out:
            self._proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self._log_dir,
                                          start_new_session=True)
        wait_http(f"{self.url}/health/liveliness", 120, log_file, self._proc)
        self._log(f"peer: litellm on {self.url} (pid {self._proc.pid}, log {log_file})")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


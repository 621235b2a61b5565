"""Starts Switchyard's own processes (ingress, routers, usage worker, optionally the fake
upstream) as children with the environment of one Settings object. Serves `make up` and the
test fixtures alike, so both run the gateway exactly the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from compose.children import Children, wait_http
from topics.settings import Settings


class Gateway(Children):
    def __init__(self, settings: Settings, log_dir: Path, *, routers: int = 1,
                 fake_upstream_port: int | None = None,
                 extra_env: dict[str, str] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self._log_dir = log_dir
        self._routers = routers
        self._fake_port = fake_upstream_port
        self._extra_env = extra_env or {}
        self._log = log
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.ingress.host}:{self.settings.ingress.port}"

    def start(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        if self._fake_port is not None:
            self.spawn("fake-upstream", "fake-upstream", "--host", "127.0.0.1", "--port",
                       str(self._fake_port))
            wait_http(f"http://127.0.0.1:{self._fake_port}/_fake/stats", 20,
                      self._log_dir / "fake-upstream.log", self.processes["fake-upstream"])
        self.spawn("usage", "usage")
        if not self.settings.router.classify_inline:
            self.spawn("classifier", "classifier")
        for i in range(self._routers):
            self.spawn(f"router-{i}", "router")
        self.spawn("ingress", "ingress")
        wait_http(f"{self.url}/v1/health", 30, self._log_dir / "ingress.log",
                  self.processes["ingress"])
        self._log(f"gateway: {self.url} (logs in {self._log_dir})")

    def spawn(self, name: str, *command: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `switchyard <command>` as child `name`, with `env` over the settings'."""
        env = {**os.environ, **self.settings.to_env(), **self._extra_env, **(env or {})}
        with (self._log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "compose.cli", *command], env=env, stdout=out,
                stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def log_file(self, name: str) -> Path:
        return self._log_dir / f"{name}.log"

    def kill(self, name: str) -> None:
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait(timeout=30)

    def terminate(self, name: str) -> None:
        """Stop child `name` gracefully (SIGTERM: it drains), killing it after 25 s."""
        proc = self.processes.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        # Front door first, so nothing new arrives while the workers drain.
        order = sorted(self.processes, key=lambda n: (n != "ingress", n.startswith("usage"),
                                                      n == "fake-upstream"))
        for name in order:
            self.terminate(name)

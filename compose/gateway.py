"""Starts Switchyard's own processes (ingress, routers, usage worker, optionally the fake
upstream) as children with the environment of one Settings object. Serves `make up` and the
test fixtures alike, so both run the gateway exactly the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from topics.settings import Settings


class GatewayError(RuntimeError):
    pass


class Gateway:
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
            _wait_http(f"http://127.0.0.1:{self._fake_port}/_fake/stats", 20,
                       self._log_dir / "fake-upstream.log")
        self.spawn("usage", "usage")
        self.spawn("classifier", "classifier")
        for i in range(self._routers):
            self.spawn(f"router-{i}", "router")
        self.spawn("ingress", "ingress")
        _wait_http(f"{self.url}/v1/health", 30, self._log_dir / "ingress.log")
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

    def stop(self) -> None:
        # Front door first, so nothing new arrives while the workers drain.
        order = sorted(self.processes, key=lambda n: (n != "ingress", n.startswith("usage"),
                                                      n == "fake-upstream"))
        for name in order:
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=25)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()

    def __enter__(self) -> Gateway:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _wait_http(url: str, timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise GatewayError(f"{url} not healthy after {timeout_s:.0f}s ({last}); see {log_file}")

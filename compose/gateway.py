"""Starts Switchyard's own processes (ingress, routers, usage worker, audit writer, optionally
the fake upstream) as children with the environment of one Settings object. Serves `make up` and the
test fixtures alike, so both run the gateway exactly the same way.

`supervise()` (what `switchyard up` runs) restarts a child that exits on its own, after an
exponential backoff, and gives up only when one keeps dying (`RestartPolicy`). Without it,
as in the test fixtures, a child that dies stays dead. A child stopped through `kill` or
`terminate` is never restarted: those take it out of `processes` first.

With `metrics_ports` (child name → port: `default_metrics_ports` in `make up`, free ports in
the tests), each worker serves `/metrics`, `/healthz` and `/readyz` on its port
(`workers/probes.py`); `metrics_urls` says where."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from compose.children import LAUNCHER_PID_ENV, Children, wait_http
from topics.settings import Settings

# The operations contract's metrics ports (docs/operations.md): the first router 9101, the
# usage worker 9102, the audit writer 9103, the classifier stage 9104; more routers 9111, ….
METRICS_PORTS = {"usage": 9102, "audit": 9103, "classifier": 9104}
ROUTER_METRICS_PORT = 9101
MORE_ROUTERS_METRICS_PORT = 9110  # + the router's number: router-1 on 9111

# Which settings section a child's metrics port is in.
_METRICS_SECTION = {"router": "ROUTER", "usage": "USAGE", "audit": "AUDIT",
                    "classifier": "CLASSIFIER"}


def default_metrics_ports(routers: int) -> dict[str, int]:
    """The contract's metrics port of every worker `make up` starts, by child name."""
    return {**METRICS_PORTS, **{
        f"router-{i}": ROUTER_METRICS_PORT if i == 0 else MORE_ROUTERS_METRICS_PORT + i
        for i in range(routers)}}


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """A child that exits on its own is restarted after `backoff_initial_s`, doubled for each
    earlier restart of it within `window_s` (at most `backoff_max_s`). Once it has been
    restarted `max_restarts` times within `window_s`, it is not restarted again: the
    supervisor gives up."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0

    def delay(self, recent: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** recent))


class GaveUp(RuntimeError):
    """A child kept dying; the message says which, how, and where its log is."""


@dataclass(slots=True)
class _Spec:
    command: tuple[str, ...]
    env: dict[str, str] | None
    restarts: list[float] = field(default_factory=list)  # monotonic times
    due: float | None = None  # a restart is scheduled for then


class Gateway(Children):
    def __init__(self, settings: Settings, log_dir: Path, *, routers: int = 1,
                 fake_upstream_port: int | None = None,
                 extra_env: dict[str, str] | None = None,
                 metrics_ports: Mapping[str, int] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self._metrics_ports = dict(metrics_ports or {})
        self._log_dir = log_dir
        self._routers = routers
        self._fake_port = fake_upstream_port
        self._extra_env = extra_env or {}
        self._log = log
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._specs: dict[str, _Spec] = {}
        self._stopping: list[subprocess.Popen[bytes]] = []  # signalled, not yet reaped
        # supervise() may run in another thread than kill/terminate/spawn (tests do so).
        self._lock = threading.RLock()

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
        self.spawn("usage", "usage", env=self._metrics_env("usage"))
        self.spawn("audit", "audit", "run", env=self._metrics_env("audit"))
        if not self.settings.router.classify_inline:
            self.spawn("classifier", "classifier", env=self._metrics_env("classifier"))
        for i in range(self._routers):
            self.spawn(f"router-{i}", "router", env=self._metrics_env(f"router-{i}"))
        self.spawn("ingress", "ingress")
        wait_http(f"{self.url}/v1/health", 30, self._log_dir / "ingress.log",
                  self.processes["ingress"])
        self._log(f"gateway: {self.url} (logs in {self._log_dir})")

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Child name → its `/metrics` URL: every process started with a metrics port, and
        the ingress (which serves `/metrics` on its own port)."""
        urls = {name: f"http://{self._metrics_host(name)}:{port}/metrics"
                for name, port in self._metrics_ports.items() if name in self._specs}
        return {"ingress": f"{self.url}/metrics", **urls}

    def _metrics_host(self, name: str) -> str:
        host: str = getattr(self.settings, _METRICS_SECTION[name.split("-")[0]].lower()
                            ).metrics_host
        return "127.0.0.1" if host == "0.0.0.0" else host

    def _metrics_env(self, name: str) -> dict[str, str] | None:
        port = self._metrics_ports.get(name)
        if port is None:
            return None
        section = _METRICS_SECTION[name.split("-")[0]]
        return {f"SWITCHYARD_{section}__METRICS_PORT": str(port)}

    def spawn(self, name: str, *command: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `switchyard <command>` as child `name`, with `env` over the settings'."""
        with self._lock:
            proc = self._popen(name, command, env)
            self._specs[name] = _Spec(tuple(command), env)
            return proc

    def _popen(self, name: str, command: tuple[str, ...],
               env: dict[str, str] | None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, **self.settings.to_env(), **self._extra_env, **(env or {}),
                    LAUNCHER_PID_ENV: str(os.getpid())}  # they stop if this process dies
        with (self._log_dir / f"{name}.log").open("ab") as out:
            # Own session: a terminal's Ctrl-C reaches only the launcher, whose stop() then
            # signals each child once, front door first. A child that got the terminal's
            # SIGINT and then stop()'s SIGTERM would take that as "exit now", undrained.
            proc = subprocess.Popen(
                [sys.executable, "-m", "compose.cli", *command], env=full_env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def log_file(self, name: str) -> Path:
        return self._log_dir / f"{name}.log"

    def restarts(self, name: str) -> int:
        """How many times `supervise()` has restarted child `name`."""
        with self._lock:
            spec = self._specs.get(name)
            return len(spec.restarts) if spec is not None else 0

    def kill(self, name: str) -> None:
        with self._lock:
            proc = self._forget(name)
        proc.kill()
        proc.wait(timeout=30)

    def terminate(self, name: str) -> None:
        """Stop child `name` gracefully (SIGTERM: it drains), killing it after 25 s."""
        self._terminate([name])

    def _terminate(self, names: list[str]) -> None:
        """SIGTERM to each of `names` at once, then wait for them all (25 s, then SIGKILL)."""
        with self._lock:
            procs = [self._forget(name) for name in names]
            self._stopping += procs
        try:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 25
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            with self._lock:
                self._stopping = [p for p in self._stopping if p not in procs]

    def _forget(self, name: str) -> subprocess.Popen[bytes]:
        self._specs.pop(name, None)
        return self.processes.pop(name)

    def stop(self) -> None:
        # Front door first, so nothing new arrives while the workers drain; then the routers
        # and the classifier together, then the usage worker and the audit writer (the last
        # usage and audit events are in Kafka by then), then the fake upstream.
        def stage(name: str) -> int:
            return (0 if name == "ingress" else 3 if name == "fake-upstream"
                    else 2 if name.startswith(("usage", "audit")) else 1)

        with self._lock:
            names = list(self.processes)
        for step in sorted({stage(n) for n in names}):
            self._terminate([n for n in names if stage(n) == step])

    def kill_all(self) -> None:
        """SIGKILL every child now, those being stopped included (a second Ctrl-C)."""
        with self._lock:
            procs = [*self.processes.values(), *self._stopping]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    def supervise(self, stopping: threading.Event, policy: RestartPolicy | None = None,
                  *, poll_s: float = 0.2) -> None:
        """Until `stopping` is set: restart any child that exits on its own, per `policy`.
        Raises GaveUp when one keeps dying; stopping the rest is then the caller's (leaving
        the `with Gateway(...)` block does it)."""
        policy = policy or RestartPolicy()
        while not stopping.wait(poll_s):
            self.check(policy)

    def check(self, policy: RestartPolicy, now: float | None = None) -> None:
        """One round of `supervise()`: note the children that died, start those due."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for name, proc in list(self.processes.items()):
                spec = self._specs.get(name)
                if spec is None or proc.poll() is None:
                    continue
                if spec.due is None:
                    self._schedule(name, proc, spec, policy, now)
                elif now >= spec.due:
                    spec.due = None
                    spec.restarts.append(now)
                    restarted = self._popen(name, spec.command, spec.env)
                    self._log(f"supervisor: {name} restarted (pid {restarted.pid}, restart "
                              f"{len(spec.restarts)})")

    def _schedule(self, name: str, proc: subprocess.Popen[bytes], spec: _Spec,
                  policy: RestartPolicy, now: float) -> None:
        spec.restarts = [t for t in spec.restarts if now - t < policy.window_s]
        how = describe_exit(proc.returncode)
        if len(spec.restarts) >= policy.max_restarts:
            raise GaveUp(
                f"{name} {how} after {len(spec.restarts)} restarts within "
                f"{policy.window_s:.0f} s: giving up, stopping everything; see "
                f"{self.log_file(name)}")
        delay = policy.delay(len(spec.restarts))
        spec.due = now + delay
        self._log(f"supervisor: {name} (pid {proc.pid}) {how}; restart "
                  f"{len(spec.restarts) + 1} in {delay:.1f} s (see {self.log_file(name)})")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"

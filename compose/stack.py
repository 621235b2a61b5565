"""The local stack: Kafka (KRaft), Redis and PostgreSQL as child processes on loopback.

`with LocalStack(settings, data_dir):` gives running services with the topics created, the
migrations applied (as the owner role, `postgres.owner_dsn`) and the application role able to
log in (`postgres.dsn`); `with LocalStack.ephemeral() as stack:` does the same on free ports in a
temp dir (see `stack.settings`), for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from compose.services import Command, Kafka, Postgres, Redis, Service, StackError
from state.migrations import apply_migrations, ensure_app_login
from topics.kafka import ensure_topics, kafka_message_bytes
from topics.settings import Settings

__all__ = ["LocalStack", "StackError", "free_port", "with_free_ports"]

T = TypeVar("T")
Log = Callable[[str], object]

_LOOPBACK = frozenset({"127.0.0.1", "localhost"})
_STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class LocalStack:
    """Starts, provisions and stops the three services; one instance per stack."""

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        *,
        log: Log = print,
        remove_data_on_stop: bool = False,
    ) -> None:
        self._settings = settings
        self._data_dir = data_dir.absolute()
        self._log = log
        self._remove_data = remove_data_on_stop
        # PostgreSQL is initialised with the owner role as its superuser; the application
        # role is created after the migrations (`ensure_app_login`), in the same database.
        pg = urlsplit(settings.postgres.owner_dsn)
        user = pg.username or "postgres"
        app = urlsplit(settings.postgres.dsn)
        if (app.port, app.path) != (pg.port, pg.path):
            raise StackError("postgres: postgres.dsn and postgres.owner_dsn must name the same "
                             f"port and database (:{app.port}{app.path} and :{pg.port}{pg.path})")
        self._kafka = Kafka(self._data_dir, _port("kafka", settings.kafka.bootstrap_servers),
                            max_message_bytes=kafka_message_bytes(settings.kafka))
        self._redis = Redis(self._data_dir, _port("redis", settings.redis.url))
        self._postgres = Postgres(
            self._data_dir, _port("postgres", settings.postgres.owner_dsn), user,
            pg.path.lstrip("/") or user,
        )  # fmt: skip
        self._services: tuple[Service, ...] = (self._kafka, self._redis, self._postgres)
        # Every child started, daemons and one-off commands alike, so stop() finds them all.
        self._children: list[tuple[Service, subprocess.Popen[bytes]]] = []
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        # All children are forked from this one long-lived thread: PR_SET_PDEATHSIG fires when
        # the *thread* that forked a child exits, not the process.
        self._spawner: ThreadPoolExecutor | None = None

    @classmethod
    def ephemeral(cls, base: Settings | None = None, *, log: Log = print) -> LocalStack:
        """A stack on free ports in a fresh temp dir, which `stop()` removes (for tests)."""
        data_dir = Path(tempfile.mkdtemp(prefix="switchyard-stack-"))
        # mkdtemp makes it 0700; as root, PostgreSQL runs as `postgres` and must traverse it.
        data_dir.chmod(0o755)
        settings = with_free_ports(base if base is not None else Settings())
        return cls(settings, data_dir, log=log, remove_data_on_stop=True)

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def pids(self) -> dict[str, int]:
        """The running daemons' process ids, by service name."""
        return {name: p.pid for name, p in self._daemons.items() if p.poll() is None}

    def start(self) -> None:
        """Start the services, wait until healthy, create topics, apply migrations.

        Blocks; raises StackError naming the failing service and its log. Safe to call from
        inside a running event loop (it then runs its own loop in a helper thread).
        """
        if self._spawner is not None:
            return
        started = time.monotonic()
        for service in self._services:
            for port in service.ports:
                _check_port_free(service.name, port)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if self._postgres.dirs:
            self._log(f"stack: postgres data in {self._postgres.home}: the postgres user "
                      f"cannot traverse {self._data_dir}")  # fmt: skip
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchyard-stack")
        try:
            _run(self._start_all())
        except BaseException:
            self.stop()
            raise
        self._log(f"stack: ready in {time.monotonic() - started:.1f} s (logs in {self._data_dir})")

    def stop(self) -> None:
        """Stop every child (graceful signal, then SIGKILL after ~10 s). Idempotent."""
        children, self._children = self._children, []
        self._daemons = {}
        for service, proc in children:
            if proc.poll() is None:
                _signal(proc, service.stop_signal)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for service, proc in children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log(f"stack: {service.name} ignored {service.stop_signal.name}; killing it")
                _kill_group(proc)
                proc.wait()
        if self._spawner is not None:
            self._spawner.shutdown()
            self._spawner = None
        if self._remove_data:
            for path in (self._data_dir, *(d for s in self._services for d in s.dirs)):
                shutil.rmtree(path, ignore_errors=True)

    def kill(self, name: str) -> None:
        """SIGKILL one service's daemon, as a crash would (fault tests)."""
        proc = self._daemons.pop(name)
        _kill_group(proc)
        proc.wait()

    def start_again(self, name: str) -> None:
        """Start a service killed by `kill` again, on the same port and data directory; blocks
        until it is ready."""
        service = next(s for s in self._services if s.name == name)
        _run(self._bring_up(service))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _start_all(self) -> None:
        async def kafka() -> None:
            await self._bring_up(self._kafka)
            created = await ensure_topics(self._settings.kafka)
            self._log(f"stack: kafka topics created: {', '.join(created) or 'none (all exist)'}")

        async def postgres() -> None:
            await self._bring_up(self._postgres)
            pg = self._settings.postgres
            applied = await apply_migrations(pg.owner_dsn)
            self._log(f"stack: migrations applied: {', '.join(applied) or 'none (up to date)'}")
            self._log(f"stack: application role: {await ensure_app_login(pg.owner_dsn, pg.dsn)}")

        # Independent services start concurrently; the first failure cancels the others.
        await asyncio.gather(kafka(), self._bring_up(self._redis), postgres())

    async def _bring_up(self, service: Service) -> None:
        started = time.monotonic()
        for command in service.prepare():
            proc = self._spawn(service, command)
            tool = Path(command.argv[0]).name
            while proc.poll() is None:
                if time.monotonic() - started > service.ready_timeout_s:
                    raise _failure(service, f"`{tool}` did not finish in time")
                await asyncio.sleep(0.05)
            if proc.returncode != 0:
                raise _failure(service, f"`{tool}` exited with {proc.returncode}")
        proc = self._spawn(service, service.daemon())
        self._daemons[service.name] = proc
        await _wait_ready(service, proc, started + service.ready_timeout_s)
        await service.provision()
        ports = "/".join(map(str, service.ports))
        self._log(
            f"stack: {service.name} ready in {time.monotonic() - started:.1f} s "
            f"(pid {proc.pid}, port {ports}, log {service.log_path})"
        )

    def _spawn(self, service: Service, command: Command) -> subprocess.Popen[bytes]:
        if self._spawner is None:
            raise StackError(f"{service.name}: the stack was stopped while starting")
        account = command.run_as
        env = os.environ | dict(command.env)
        if account is not None:
            env |= {"HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name}
        preexec = _die_with_parent()

        def spawn() -> subprocess.Popen[bytes]:
            with service.log_path.open("ab") as log:
                return subprocess.Popen(
                    command.argv,
                    cwd=command.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Own session: a terminal's Ctrl-C reaches only us, and stop() then shuts
                    # the children down gracefully instead of them dying mid-write.
                    start_new_session=True,
                    preexec_fn=preexec,
                    user=account.pw_uid if account else None,
                    group=account.pw_gid if account else None,
                    extra_groups=[] if account else None,
                )

        proc = self._spawner.submit(spawn).result()
        self._children.append((service, proc))
        return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_free_ports(settings: Settings) -> Settings:
    """A copy of `settings` whose Kafka (port and port + 1), Redis and PostgreSQL use free
    loopback ports."""
    held: list[socket.socket] = []
    try:
        # Hold every chosen port until all are chosen, so no two picks coincide.
        def pick(pair: bool = False) -> int:
            while True:
                sock = _bind(0)
                port: int = sock.getsockname()[1]
                held.append(sock)
                if not pair:
                    return port
                try:
                    held.append(_bind(port + 1))
                    return port
                except OSError:
                    continue

        kafka, redis, postgres = pick(pair=True), pick(), pick()
    finally:
        for sock in held:
            sock.close()
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{kafka}"}),
            "redis": settings.redis.model_copy(
                update={"url": _with_port(settings.redis.url, redis)}
            ),
            "postgres": settings.postgres.model_copy(
                update={"dsn": _with_port(settings.postgres.dsn, postgres),
                        "owner_dsn": _with_port(settings.postgres.owner_dsn, postgres)}
            ),
        }
    )


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    try:
        # Like the servers themselves: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _check_port_free(name: str, port: int) -> None:
    try:
        _bind(port).close()
    except OSError as exc:
        raise StackError(
            f"{name}: port 127.0.0.1:{port} is already in use by another process "
            f"({exc.strerror}); stop it or configure another port"
        ) from None


def _port(name: str, address: str) -> int:
    """The port of a URL/DSN, or of the first host:port of a Kafka bootstrap list."""
    if "://" not in address:
        address = "kafka://" + address.split(",")[0].strip()
    parts = urlsplit(address)
    if parts.hostname not in _LOOPBACK:
        raise StackError(f"{name}: the local stack listens on 127.0.0.1, not {parts.hostname}")
    defaults = {"redis": 6379, "postgres": 5432}
    port = parts.port or defaults.get(name)
    if port is None:
        raise StackError(f"{name}: no port in {address!r}")
    return port


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _wait_ready(service: Service, proc: subprocess.Popen[bytes], deadline: float) -> None:
    last_error = "none"
    while True:
        if proc.poll() is not None:
            raise _failure(service, f"exited with code {proc.returncode} while starting")
        try:
            await asyncio.wait_for(service.probe(), timeout=5)
            return
        except Exception as exc:  # every client library fails differently while starting
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise _failure(service, f"not healthy in {service.ready_timeout_s:.0f} s "
                           f"(last probe error: {last_error})")  # fmt: skip
        await asyncio.sleep(0.1)


def _failure(service: Service, what: str) -> StackError:
    try:
        tail = service.log_path.read_text(errors="replace").splitlines()[-15:]
    except OSError:
        tail = []
    shown = "".join(f"\n  | {line}" for line in tail)
    return StackError(f"{service.name}: {what}; see {service.log_path}{shown}")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when our spawner thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: the child must not take locks (dlsym, imports) between fork and exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    getppid, parent, exit_now, sigkill = os.getppid, os.getpid(), os._exit, int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if getppid() != parent:  # the parent died before prctl took effect
            exit_now(1)

    return preexec


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The child leads its own session, so its group also holds any workers it forked.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchyard-stack-start")
    try:
        return pool.submit(asyncio.run, coro).result()
    finally:
        pool.shutdown(wait=False)

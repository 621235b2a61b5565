"""The three services of the local stack: how each is prepared, run and probed.

A service knows only its own files and process; `compose.stack.LocalStack` spawns, watches
and stops the processes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

KAFKA_VERSION = "3.9.1"
KAFKA_LIBS = Path("~/.cache/switchyard") / f"kafka-{KAFKA_VERSION}" / "libs"
POSTGRES_BINS = Path("/usr/lib/postgresql")

# The full tiered JIT (C2), not C1 only: C1-only started the broker 0.45 s sooner, but under
# load it cost more CPU per message and a millisecond per hop (bench.latency at 100 req/s:
# added p50 7.1 → 6.0 ms, streaming TTFT +10.5 → +7.0 ms). The parallel collector, not the
# serial one: at 100 req/s the serial collector paused the broker 15–29 ms every ~6 s (every
# Kafka hop stalls with it, which is the gateway's p99), the parallel one 6–12 ms every
# 10–30 s (-Xlog:gc, bench.ab 100).
KAFKA_JVM_OPTS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseParallelGC",
    "-Djava.awt.headless=true",
)

# Hard limit, soft limit, soft seconds of a pub/sub client's output buffer.
REDIS_PUBSUB_BUFFER = "pubsub 256mb 64mb 60"

_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=WARN
log4j.logger.org.apache.kafka=WARN
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.state.change.logger=WARN
# Keep the one line that says the broker is up.
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


class StackError(RuntimeError):
    """A service of the local stack could not be started; the message names it and its log."""


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    cwd: Path
    run_as: pwd.struct_passwd | None = None  # only ever set when we are root
    env: Mapping[str, str] = field(default_factory=dict)  # added to the inherited environment


class Service(ABC):
    name: str
    # Postgres overrides this: its SIGTERM ("smart" shutdown) waits for every client to leave.
    stop_signal: signal.Signals = signal.SIGTERM
    ready_timeout_s: float = 30.0

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_path = data_dir / f"{self.name}.log"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    @property
    def dirs(self) -> tuple[Path, ...]:
        """Directories outside data_dir that hold this service's data (removed with it)."""
        return ()

    def prepare(self) -> list[Command]:
        """Write config and directories; returns the one-off commands still to run, in order."""
        return []

    @abstractmethod
    def daemon(self) -> Command: ...

    @abstractmethod
    async def probe(self) -> None:
        """Returns when the service answers; raises while it does not."""

    async def provision(self) -> None:
        """Runs once the probe succeeds."""
        return None


class Kafka(Service):
    name = "kafka"
    ready_timeout_s = 60.0

    def __init__(self, data_dir: Path, port: int, *, max_message_bytes: int) -> None:
        super().__init__(data_dir, port)
        self.max_message_bytes = max_message_bytes  # topics.kafka.kafka_message_bytes
        self.home = data_dir / "kafka"
        self.log_dirs = self.home / "data"
        self.libs = KAFKA_LIBS.expanduser()

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, self.port + 1)

    def _java(self, main: str, *args: str) -> Command:
        java = shutil.which("java")
        if java is None:
            raise StackError("kafka: no `java` on PATH; install a JRE 17+ (compose/bootstrap.sh)")
        if not (self.libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
            raise StackError(f"kafka: broker jars missing in {self.libs}; run compose/bootstrap.sh")
        log4j = f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}"
        argv = (java, *KAFKA_JVM_OPTS, log4j, "-cp", f"{self.libs}/*", main, *args)
        return Command(argv, self.home)

    def prepare(self) -> list[Command]:
        self.log_dirs.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.port + 1}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.port + 1}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50: the first consumer group joins in ms, not seconds.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # Sized for a 2-core box (defaults 3 and 8): every idle thread wakes ~3 times a
            # second to poll. The broker's request threads idle at 7 CPU-ms/s instead of 10
            # (`python -m bench.idle`); the closed loop serves as much (`bench.compare`).
            "num.network.threads": "1",
            "num.io.threads": "2",
            "auto.create.topics.enable": "false",
            # Any body the ingress accepts fits (topics.kafka): our topics carry their own
            # max.message.bytes; the broker's default covers any other topic, and a request
            # holding the largest message stays under the socket's request limit.
            "message.max.bytes": str(self.max_message_bytes),
            "replica.fetch.max.bytes": str(self.max_message_bytes),
            "socket.request.max.bytes": str(max(104_857_600, 2 * self.max_message_bytes)),
        }
        text = "".join(f"{key}={value}\n" for key, value in props.items())
        (self.home / "server.properties").write_text(text)
        (self.home / "log4j.properties").write_text(_LOG4J)
        if (self.log_dirs / "meta.properties").exists():
            return []
        config = str(self.home / "server.properties")
        fmt = ("format", "-t", _cluster_id(), "-c", config, "--ignore-formatted")
        return [self._java("kafka.tools.StorageTool", *fmt)]

    def daemon(self) -> Command:
        return self._java("kafka.Kafka", str(self.home / "server.properties"))

    async def probe(self) -> None:
        # A plain connect first: aiokafka logs an ERROR for every refused bootstrap attempt.
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.close()
        await writer.wait_closed()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=5000
        )
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()


class Redis(Service):
    name = "redis"
    ready_timeout_s = 15.0

    def prepare(self) -> list[Command]:
        (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
        return []

    def daemon(self) -> Command:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackError("redis: no `redis-server` on PATH; run compose/bootstrap.sh")
        # The pub/sub output buffer holds a reply frame until the ingress has read it; the
        # default hard limit (32 MB) would drop the ingress's subscription, and every answer
        # on it, for one answer near `kafka.max_message_bytes` (docs/operations.md).
        argv = (redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.data_dir / "redis"),
                "--client-output-buffer-limit", REDIS_PUBSUB_BUFFER)  # fmt: skip
        return Command(argv, self.data_dir / "redis")

    async def probe(self) -> None:
        client = aioredis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()


class Postgres(Service):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnects clients, then exits cleanly
    ready_timeout_s = 60.0

    def __init__(self, data_dir: Path, port: int, user: str, database: str) -> None:
        super().__init__(data_dir, port)
        self.user = user
        self.database = database
        # PostgreSQL refuses to run as root, so root runs it as the Debian package's user.
        self.run_as = _postgres_account() if os.geteuid() == 0 else None
        wanted = data_dir / "postgres"
        if self.run_as is None or _traversable(data_dir, self.run_as):
            self.home = wanted
        else:
            # The postgres user cannot reach data_dir (e.g. under /root); a stable per-data_dir
            # directory under /tmp keeps the data across restarts of the same stack.
            digest = hashlib.sha256(str(wanted.resolve()).encode()).hexdigest()[:12]
            self.home = Path(tempfile.gettempdir()) / f"switchyard-pg-{digest}"

    @property
    def dirs(self) -> tuple[Path, ...]:
        return () if self.home.is_relative_to(self.data_dir) else (self.home,)

    def _bin(self, tool: str) -> str:
        versions = sorted(
            (int(p.name) for p in POSTGRES_BINS.glob("*") if p.name.isdigit()), reverse=True
        )
        for version in versions:
            path = POSTGRES_BINS / str(version) / "bin" / tool
            if path.is_file():
                return str(path)
        raise StackError(f"postgres: no {tool} under {POSTGRES_BINS}/*/bin; run bootstrap.sh")

    def _command(self, *argv: str) -> Command:
        # The C locale never depends on which locales the machine happens to have generated.
        return Command(argv, self.home, self.run_as, {"LC_ALL": "C", "LANG": "C"})

    def prepare(self) -> list[Command]:
        if (self.home / "PG_VERSION").exists():
            return []
        # No PG_VERSION: never initialised, or an initdb that was interrupted; start over.
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(mode=0o700, parents=True)
        if self.run_as is not None:
            os.chown(self.home, self.run_as.pw_uid, self.run_as.pw_gid)
        # --no-sync: like fsync=off below, durability across a machine crash is not a goal.
        return [self._command(self._bin("initdb"), "-D", str(self.home), "-A", "trust",
                              "-U", self.user, "-E", "UTF8", "--locale=C", "--no-sync",
                              "--no-instructions")]  # fmt: skip

    def daemon(self) -> Command:
        # A Unix socket path longer than sun_path (108 bytes) is fatal; TCP is all we use.
        socket_dir = str(self.home) if len(str(self.home)) < 80 else ""
        # fsync/full_page_writes off: a dev and test stack trades crash safety of the machine
        # for speed; never copy these settings to production. synchronous_commit stays on (a
        # commit's WAL reaches the kernel before it is acknowledged; without fsync that is one
        # write()): with it off, a SIGKILLed postgres forgot the last ~0.6 s of acknowledged
        # commits, usage rows included (bench.chaos, kill-postgres).
        return self._command(
            self._bin("postgres"), "-D", str(self.home), "-p", str(self.port), "-k", socket_dir,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "full_page_writes=off",
        )  # fmt: skip

    async def _connect(self, database: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=self.user, database=database, timeout=5
        )

    async def probe(self) -> None:
        conn = await self._connect("postgres")
        await conn.close()

    async def provision(self) -> None:
        conn = await self._connect("postgres")
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                quoted = '"' + self.database.replace('"', '""') + '"'
                await conn.execute(f"CREATE DATABASE {quoted}")
        finally:
            await conn.close()


def _cluster_id() -> str:
    # Kafka's Uuid.randomUuid(): base64url of 16 random bytes, unpadded, never starting with
    # "-" (command-line parsers would take it for an option).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if re.match(r"[A-Za-z0-9_]", text):
            return text


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "postgres: running as root, but there is no `postgres` system user to run "
            "PostgreSQL as (install the Debian `postgresql` package: compose/bootstrap.sh)"
        ) from None


def _traversable(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may traverse `path` and every directory above it."""
    resolved = path.resolve()
    for part in [resolved, *resolved.parents]:
        try:
            st = part.stat()
        except FileNotFoundError:
            continue  # created later by us, with the default (traversable) mode
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True

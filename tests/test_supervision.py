"""`switchyard up`'s supervision and every process's bounded stop, on a stack of their own
(these tests pause its Kafka, Redis and PostgreSQL, which the session stack's users must never
see): a SIGKILLed router is restarted and serves again; a process that keeps dying makes the
supervisor give up; a router asked to stop while a service it uses is paused (SIGSTOP: its
connections hang instead of failing) still exits within its grace period plus the close
budget."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from compose.children import wait_http
from compose.gateway import Gateway, GaveUp, RestartPolicy, describe_exit
from compose.stack import LocalStack, free_port, with_free_ports
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from topics.settings import RouterSettings, Settings
from topics.shutdown import ShutdownWatchdog

GRACE_S = 2.0
# What a hang may add to the grace period: the close budget (3 s by default) and the
# watchdog's 1 s margin, with room for a loaded machine.
BOUND_S = 5.0


@pytest.fixture(scope="module")
def own_stack() -> Iterator[LocalStack]:
    base = Settings(router=RouterSettings(shutdown_grace_s=GRACE_S))
    with LocalStack.ephemeral(base) as local:
        yield local


def _settings(stack: LocalStack, fake_port: int) -> Settings:
    return stack.settings.model_copy(update={
        "ingress": stack.settings.ingress.model_copy(update={"port": free_port()}),
        "fallback_upstream_url": f"http://127.0.0.1:{fake_port}/v1"})


class _Supervisor:
    """`Gateway.supervise` in a thread, as `switchyard up` runs it in its main thread."""

    def __init__(self, gateway: Gateway, policy: RestartPolicy) -> None:
        self.stopping = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                gateway.supervise(self.stopping, policy, poll_s=0.05)
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=10)


async def test_a_sigkilled_router_is_restarted_and_serves_again(
        own_stack: LocalStack, tmp_path: Path) -> None:
    fake_port = free_port()
    settings = _settings(own_stack, fake_port)
    api_key = await _api_key(settings)
    said: list[str] = []
    with Gateway(settings, tmp_path, fake_upstream_port=fake_port, log=said.append) as gateway:
        supervisor = _Supervisor(gateway, RestartPolicy(backoff_initial_s=0.2))
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60, headers={
                    "Authorization": f"Bearer {api_key}",
                    "x-switchyard-timeout-ms": "45000"}) as http:
                assert (await _ask(http)).status_code == 200
                victim = gateway.processes["router-0"]
                victim.send_signal(signal.SIGKILL)

                def restarted() -> bool:
                    proc = gateway.processes["router-0"]
                    return proc is not victim and proc.poll() is None

                await eventually(restarted, timeout_s=10)
                assert gateway.restarts("router-0") == 1
                assert any(f"router-0 (pid {victim.pid}) was killed by SIGKILL; restart 1 in "
                           in line for line in said), said
                # The only router of its consumer group is the new one: this answer is its.
                response = await _ask(http)
                assert response.status_code == 200, response.text
                assert gateway.log_file("router-0").read_text().count("consuming") == 2

            # A deliberate stop is not a death: the supervisor leaves it stopped.
            gateway.terminate("router-0")
            await asyncio.sleep(0.5)
            assert "router-0" not in gateway.processes
            assert supervisor.error is None
        finally:
            supervisor.stop()
    assert supervisor.error is None, supervisor.error


async def _ask(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "still there?"}]})


async def test_a_router_with_work_in_flight_stops_in_bounded_time_while_kafka_is_paused(
        own_stack: LocalStack, tmp_path: Path) -> None:
    """Its answers and usage events cannot be produced, its last commit and its leaving the
    group cannot reach the broker: it still exits within grace + the bound."""
    fake_port = free_port()
    settings = _settings(own_stack, fake_port)
    api_key = await _api_key(settings)
    with Gateway(settings, tmp_path, fake_upstream_port=fake_port) as gateway:
        fake = FakeAdmin(f"http://127.0.0.1:{fake_port}/v1")
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60, headers={
                    "Authorization": f"Bearer {api_key}"}) as http:
                assert (await _ask(http)).status_code == 200  # the router is serving
                await fake.configure(ttft_ms=30_000)
                calls = [asyncio.create_task(_ask(http)) for _ in range(3)]
                await eventually(lambda: _requests_seen(fake, 4), timeout_s=20)
                router = gateway.processes.pop("router-0")
                kafka = own_stack.pids()["kafka"]
                os.killpg(kafka, signal.SIGSTOP)
                try:
                    await asyncio.sleep(1)
                    started = time.monotonic()
                    router.send_signal(signal.SIGTERM)
                    code = await asyncio.to_thread(_wait, router, GRACE_S + BOUND_S + 10)
                    took = time.monotonic() - started
                finally:
                    os.killpg(kafka, signal.SIGCONT)
                    if router.poll() is None:
                        router.kill()
                        router.wait()
                print(f"router with 3 requests in flight stopped {took:.2f} s after SIGTERM "
                      f"with kafka paused ({describe_exit(code)})")
                log = gateway.log_file("router-0").read_text()[-3000:]
                assert took <= GRACE_S + BOUND_S, log
                assert code in (0, 1), log
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await fake.aclose()


async def _api_key(settings: Settings) -> str:
    conn = await asyncpg.connect(settings.postgres.owner_dsn)
    try:
        _, api_key = await create_key(conn, "supervised")
    finally:
        await conn.close()
    return api_key


async def _requests_seen(fake: FakeAdmin, at_least: int) -> bool:
    return int((await fake.stats())["requests_total"]) >= at_least


def test_switchyard_up_restarts_a_killed_router_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The real command, on free ports: a router SIGKILLed under it is restarted and serves;
    Ctrl-C (SIGINT to its process group, as a terminal sends it) then stops everything, each
    worker draining once, none restarted."""
    settings = with_free_ports(Settings())
    settings = settings.model_copy(update={
        "ingress": settings.ingress.model_copy(update={"port": free_port()})})
    up = subprocess.Popen(
        [sys.executable, "-m", "compose.cli", "up", "--data-dir", str(tmp_path / "up"),
         "--fake-upstream-port", str(free_port()),
         # The workers' default metrics ports are fixed: another stack on this machine may
         # hold them (tests/test_metrics.py covers them on free ports).
         "--metrics-ports", "off"],
        env={**os.environ, **settings.to_env()}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = _Lines(up)
    try:
        ready = output.wait_for("dev API key", 120)
        api_key = ready.rsplit(": ", 1)[1].strip()
        output.wait_for("Ctrl-C stops everything", 10)
        assert f"ingress: http://127.0.0.1:{settings.ingress.port}/metrics" in output.text()
        victim = _child_pid(up.pid, "router")
        os.kill(victim, signal.SIGKILL)
        output.wait_for(f"router-0 (pid {victim}) was killed by SIGKILL; restart 1 in", 10)
        output.wait_for("router-0 restarted", 10)
        response = httpx.post(
            f"http://127.0.0.1:{settings.ingress.port}/v1/chat/completions", timeout=60,
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text

        os.killpg(up.pid, signal.SIGINT)  # a terminal's Ctrl-C
        assert up.wait(timeout=90) == 0, output.text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        output.close()
    after_stop = output.text().split("stopping…", 1)[1]
    assert "restart" not in after_stop, output.text()
    router_log = (tmp_path / "up/logs/router-0.log").read_text()
    assert "router-" in router_log
    assert router_log.count("stopping within") == 1, router_log[-3000:]  # one signal only
    assert "exiting now" not in router_log, router_log[-3000:]


_LAUNCHER = """
import sys, time
from pathlib import Path
from compose.gateway import Gateway
from topics.settings import Settings
gateway = Gateway(Settings(), Path(sys.argv[1]), fake_upstream_port=int(sys.argv[2]),
                  log=lambda line: None)
gateway.start()
print(" ".join(str(p.pid) for p in gateway.processes.values()), flush=True)
time.sleep(600)
"""


def test_a_gateways_processes_stop_when_their_launcher_is_killed(
        own_stack: LocalStack, tmp_path: Path) -> None:
    """A launcher SIGKILLed (by the OOM killer, or a CI job's timeout) cannot stop its
    children; they notice it is gone and stop themselves, draining (SIGTERM), instead of
    running on as orphans that hold ports and CPU."""
    fake_port = free_port()
    settings = _settings(own_stack, fake_port)
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path), str(fake_port)],
        env={**os.environ, **settings.to_env()}, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    try:
        children = [int(pid) for pid in launcher.stdout.readline().split()]
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stdout.close()
    assert len(children) == 5  # fake upstream, usage, audit, router, ingress

    def all_gone() -> bool:
        return not any(_running(pid) for pid in children)
    deadline = time.monotonic() + GRACE_S + BOUND_S + 10
    while not all_gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in children if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after their launcher died: {left}"
    router_log = (tmp_path / "router-0.log").read_text()
    assert "stopping within" in router_log, router_log[-3000:]  # a drain, not a kill


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it, maybe
    nobody in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class _Lines:
    """A child's output, read in a thread, waited on line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((line for line in self._lines if text in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise AssertionError(f"no {text!r} in:\n{''.join(self._lines)}")
                self._changed.wait(min(left, 0.5))

    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._stdout.close()


def _child_pid(parent: int, command: str) -> int:
    """The child of `parent` running `switchyard <command>`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and argv[-2:] == [command.encode(), b""]:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} runs {command}")


def test_a_process_that_keeps_dying_makes_the_supervisor_give_up(tmp_path: Path) -> None:
    said: list[str] = []
    gateway = Gateway(Settings(), tmp_path, log=said.append)
    # An invalid setting: the process exits at once, every time.
    gateway.spawn("router-bad", "router", env={"SWITCHYARD_ROUTER__MAX_IN_FLIGHT": "0"})
    policy = RestartPolicy(backoff_initial_s=0.05, max_restarts=2, window_s=60)
    try:
        with pytest.raises(GaveUp, match=r"router-bad exited with code 1 after 2 restarts "
                           r"within 60 s: giving up"):
            gateway.supervise(threading.Event(), policy, poll_s=0.05)
    finally:
        gateway.stop()
    scheduled = [re.search(r"exited with code 1; restart (\d) in ([\d.]+) s", line)
                 for line in said]
    assert [(m[1], m[2]) for m in scheduled if m] == [("1", "0.1"), ("2", "0.1")], said


def test_restart_backoff_doubles_up_to_its_ceiling() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_a_second_stop_signal_exits_at_once() -> None:
    stopped: list[bool] = []
    exits: list[int] = []
    watchdog = ShutdownWatchdog(60, on_first=lambda: stopped.append(True),
                                exit_now=exits.append)
    try:
        watchdog.signal(signal.SIGTERM)
        assert stopped == [True]
        assert exits == []
        watchdog.signal(signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        watchdog.cancel()


def test_the_watchdog_ends_a_stop_that_overruns() -> None:
    exited = threading.Event()
    codes: list[int] = []

    def exit_now(code: int) -> None:
        codes.append(code)
        exited.set()

    watchdog = ShutdownWatchdog(0.1, on_first=lambda: None, exit_now=exit_now)
    watchdog.signal(signal.SIGTERM)
    assert exited.wait(10)
    assert codes == [1]


# The router and the ingress use all three services; the usage worker's ledger is PostgreSQL.
@pytest.mark.parametrize(("process", "service"), [
    ("router", "kafka"), ("router", "redis"), ("router", "postgres"),
    ("ingress", "kafka"), ("ingress", "redis"), ("ingress", "postgres"),
    ("usage", "postgres")])
async def test_a_process_stops_in_bounded_time_while_a_service_is_paused(
        own_stack: LocalStack, tmp_path: Path, process: str, service: str) -> None:
    gateway = Gateway(_settings(own_stack, free_port()), tmp_path)
    proc = gateway.spawn(process, process)
    log = gateway.log_file(process)
    # The ingress answers no request meanwhile: its in-flight grace is not waited for.
    grace = {"router": GRACE_S, "usage": gateway.settings.usage.shutdown_grace_s}.get(process, 0)
    try:
        if process == "ingress":
            await asyncio.to_thread(wait_http, f"{gateway.url}/v1/health", 60, log, proc)
        else:
            await eventually(lambda: "assigned [" in log.read_text(), timeout_s=60)
        paused = own_stack.pids()[service]
        os.killpg(paused, signal.SIGSTOP)  # the daemon leads its own process group
        try:
            await asyncio.sleep(1)  # let the process's next calls to it start hanging
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(_wait, proc, grace + BOUND_S + 10)
            took = time.monotonic() - started
        finally:
            os.killpg(paused, signal.SIGCONT)
        print(f"{process} stopped {took:.2f} s after SIGTERM with {service} paused "
              f"({describe_exit(code)})")
        assert took <= grace + BOUND_S, log.read_text()[-3000:]
        # 1: the watchdog ended it; -SIGTERM: uvicorn re-raises the signal it stopped on.
        assert code in (0, 1, -signal.SIGTERM), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -999

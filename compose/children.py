"""What every launcher of child processes shares (the gateway's own processes, the peer
gateway a benchmark compares against): used as a context manager that stops whatever it
started, even when starting fails halfway; a wait for a child's HTTP readiness; and, on the
child's side, stopping when the launcher is gone (`stop_with_launcher`)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self


class ChildError(RuntimeError):
    """A child process did not come up; the message names its log."""


class Children:
    """Subclasses start their processes in `start` and stop them all in `stop`."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_http(url: str, timeout_s: float, log_file: Path,
              proc: subprocess.Popen[bytes] | None = None, *, poll_s: float = 0.2) -> None:
    """Until `url` answers 200; fails at once if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildError(f"{proc.args!r} exited with {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(poll_s)
    raise ChildError(f"{url} not ready after {timeout_s:.0f} s ({last}); see {log_file}")


# Set by a launcher (compose/gateway.py) in its children's environment: its own pid.
LAUNCHER_PID_ENV = "SWITCHYARD_LAUNCHER_PID"


def stop_with_launcher(env: Mapping[str, str], *, poll_s: float = 1.0) -> None:
    """In a child whose launcher named itself in `LAUNCHER_PID_ENV`: SIGTERM ourselves (the
    graceful, bounded stop) once the launcher is gone. A launcher killed outright (SIGKILL,
    an out-of-memory kill, a test run killed by its CI) cannot stop its children, and they
    run on, orphaned, holding ports and CPU; each child notices within `poll_s` instead.
    Children run in sessions of their own (a terminal's Ctrl-C is the launcher's to relay),
    so they cannot share its death through a process group; and PR_SET_PDEATHSIG follows
    the forking thread, not the process, which would stop a child restarted from the
    supervisor's timer thread as soon as that thread ends."""
    pid = env.get(LAUNCHER_PID_ENV)
    if not pid:
        return
    launcher = int(pid)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

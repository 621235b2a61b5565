"""What every launcher of child processes shares (the gateway's own processes, the peer
gateway a benchmark compares against): used as a context manager that stops whatever it
started, even when starting fails halfway; and a wait for a child's HTTP readiness."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
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

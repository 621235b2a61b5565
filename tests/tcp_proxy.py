"""A TCP proxy a test can cut: one process's connections to a real service go through it, so
that process alone loses the service (every connection closed, new ones refused) while the
rest of the suite keeps it. A fault injector in front of the real service, not a stand-in."""

from __future__ import annotations

import asyncio
import contextlib

from compose.stack import free_port

_CHUNK = 65_536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Accept connections (again, after `cut`) on the same port."""
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Close every connection and refuse new ones until `start`."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def aclose(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
        sink.close()
        self._writers.discard(sink)

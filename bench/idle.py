"""The stack's idle floor: CPU each process uses while no request arrives, after the Kafka
broker's JIT has had time to settle. At low rates this floor is a share of every request's
CPU (at 50 req/s, each 10 CPU-ms/s of it is 0.2 ms per request). The broker's threads are
shown by kind, which says whether its cost is consumers' polls, the JIT or KRaft. Writes
nothing.

    python -m bench.idle [--settle-s 180] [--window-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import time

from bench.loadgen import box_busy_s, cpu_seconds, single_upstream_gateway, stat_ticks


def thread_ticks(pid: int) -> dict[str, int]:
    """Clock ticks per thread kind of a process (numbers in thread names folded to N)."""
    out: collections.Counter[str] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, ticks = stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:
            continue  # exited meanwhile
        out[re.sub(r"\d+", "N", name)] += ticks
    return out


async def main(args: argparse.Namespace) -> None:
    async with single_upstream_gateway(lambda line: None) as served:
        await asyncio.sleep(args.settle_s)
        kafka = served.pids["kafka"]
        before = {name: cpu_seconds(pid) for name, pid in served.pids.items()}
        threads_before, box_before, t0 = thread_ticks(kafka), box_busy_s(), time.monotonic()
        await asyncio.sleep(args.window_s)
        elapsed_s = time.monotonic() - t0
        threads, box = thread_ticks(kafka), box_busy_s()
        for name, pid in sorted(served.pids.items(), key=lambda item: item[0]):
            print(f"{name:16} {1000 * (cpu_seconds(pid) - before[name]) / elapsed_s:6.1f} "
                  "CPU-ms/s")
        print(f"{'box (all)':16} {1000 * (box - box_before) / elapsed_s:6.1f} CPU-ms/s")
        tick_s = 1 / os.sysconf("SC_CLK_TCK")
        print("kafka by thread kind:")
        for kind, ticks in sorted(threads.items(), key=lambda item: -item[1]):
            used = 1000 * (ticks - threads_before.get(kind, 0)) * tick_s / elapsed_s
            if used >= 0.5:
                print(f"  {kind:34} {used:6.1f} CPU-ms/s")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settle-s", type=float, default=180.0,
                   help="wait after start-up (the broker's JIT compiles for minutes)")
    p.add_argument("--window-s", type=float, default=30.0)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))

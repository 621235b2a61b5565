"""The garbage collector of a long-running gateway process, set once it is ready to serve."""

from __future__ import annotations

import gc

# CPython's default runs a young collection after every 700 net container allocations. A
# streamed answer allocates a few dicts per chunk, so at 200 streams/s the ingress collected
# ~450 times a second, promoted frames still waiting in its queues into the old generations,
# and paid for full collections of its whole heap (~8 % of a core in the ingress; measured
# with gc.callbacks). Young objects here die within milliseconds: collect them less often,
# but not so rarely that one collection (whose cost grows with the garbage it walks) becomes
# a pause of its own: 50,000 made young collections of ~35 ms.
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Everything allocated so far (modules, clients, models) lives as long as the process:
    move it out of the collector's sight (`gc.freeze`), then collect young objects less
    often. Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)

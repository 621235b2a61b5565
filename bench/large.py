"""What a large prompt costs: one request at a time, small and large prompts alternated,
whole and streamed, through the gateway and straight at the fake upstream (the difference is
the gateway's added latency); then the Kafka hop alone for the largest prompt, with and without
producer compression.

    python -m bench.large [--requests 10] [--sizes 0,1000000,5000000]

The prompt text is the repository's own docs and code (a mix of prose and code, compressible
like real prompts), repeated up to the size. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.loadgen import single_upstream_gateway, write_section
from topics.kafka import kafka_message_bytes
from topics.settings import KafkaSettings

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- bench.large:start -->", "<!-- bench.large:end -->"
MODEL = "gpt-4.1-mini"  # a 1M-token window: a 5 MB prompt fits
ROOT = Path(__file__).resolve().parents[1]


def corpus(size: int) -> str:
    if size <= 0:
        return "bench hello there"
    files = sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("*/*.py")])
    text = "\n".join(p.read_text(errors="replace") for p in files)
    return (text * (size // len(text) + 1))[:size]


async def _timed(http: httpx.AsyncClient, url: str, headers: dict[str, str],
                 body: bytes, stream: bool) -> float:
    """Milliseconds to the whole answer, or to the first content chunk when streamed."""
    started = time.perf_counter()
    if not stream:
        response = await http.post(url, content=body, headers=headers)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000
    async with http.stream("POST", url, content=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return (time.perf_counter() - started) * 1000
    raise RuntimeError("the stream carried no content")


async def through(url: str, fake_url: str, api_key: str, sizes: list[int],
                  requests: int) -> list[dict[str, Any]]:
    rows = []
    gateway = (f"{url}/v1/chat/completions",
               {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    direct = (f"{fake_url}/v1/chat/completions", {"Content-Type": "application/json"})
    async with httpx.AsyncClient(timeout=120) as http:
        await http.put(f"{fake_url}/_fake/config", json={"tokens": 16, "inter_token_ms": 0})
        for stream in (False, True):
            bodies = {size: orjson.dumps({
                "model": MODEL, "stream": stream,
                "messages": [{"role": "user", "content": corpus(size)}]}) for size in sizes}
            samples: dict[tuple[str, int], list[float]] = {}
            for round_ in range(requests + 1):  # the first round warms up, unrecorded
                for size, body in bodies.items():  # sizes alternated: same conditions
                    for name, (target, headers) in (("direct", direct),
                                                     ("switchyard", gateway)):
                        ms = await _timed(http, target, headers, body, stream)
                        if round_:
                            samples.setdefault((name, size), []).append(ms)
            for size, body in bodies.items():
                via, straight = samples[("switchyard", size)], samples[("direct", size)]
                rows.append({
                    "stream": stream, "size": len(body),
                    "direct_p50": statistics.median(straight),
                    "gateway_p50": statistics.median(via),
                    "added_p50": statistics.median(via) - statistics.median(straight),
                    "gateway_max": max(via)})
    return rows


async def kafka_hop(settings: KafkaSettings, size: int, requests: int) -> list[dict[str, Any]]:
    """Produce (acks=all) → consume of one envelope-sized message, per compression type."""
    limit = kafka_message_bytes(settings)
    value = orjson.dumps({"body": {"messages": [{"role": "user", "content": corpus(size)}]}})
    rows = []
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        for compression in (None, "gzip"):
            topic = f"bench.large.{compression or 'none'}.{uuid.uuid4().hex[:6]}"
            await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
                "max.message.bytes": str(limit)})])
            producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                        acks="all", enable_idempotence=True,
                                        max_request_size=limit, compression_type=compression)
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                        auto_offset_reset="latest", fetch_max_wait_ms=500,
                                        max_partition_fetch_bytes=limit)
            await producer.start()
            await consumer.start()
            try:
                await consumer.seek_to_end()
                produce_ms, hop_ms, cpu_ms = [], [], []
                for round_ in range(requests + 1):
                    started, cpu = time.perf_counter(), time.process_time()
                    await producer.send_and_wait(topic, value)
                    acked = time.perf_counter()
                    cpu_produce = time.process_time() - cpu
                    await consumer.getone()
                    done = time.perf_counter()
                    if round_:
                        produce_ms.append((acked - started) * 1000)
                        hop_ms.append((done - started) * 1000)
                        cpu_ms.append(cpu_produce * 1000)
            finally:
                await consumer.stop()
                await producer.stop()
            rows.append({"compression": compression or "none", "size": len(value),
                         "produce_p50": statistics.median(produce_ms),
                         "hop_p50": statistics.median(hop_ms),
                         "producer_cpu_p50": statistics.median(cpu_ms),
                         "stored": _stored_size(value, compression)})
            await admin.delete_topics([topic])
    finally:
        await admin.close()
    return rows


def _stored_size(value: bytes, compression: str | None) -> int:
    return len(value) if compression is None else len(gzip.compress(value))


def render(rows: list[dict[str, Any]], hops: list[dict[str, Any]], command: str,
           requests: int) -> str:
    lines = ["## Large prompts: added latency and the Kafka hop (issue: message size)",
             "", f"`{command}` on {platform.machine()} ({platform.python_version()}), one "
             f"request at a time, {requests} per cell (median). Added = through Switchyard "
             "minus straight at the fake upstream, same body.", "",
             "| answer | body | fake alone p50 | via gateway p50 | added p50 | via gateway max |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        what = "streamed (TTFT)" if r["stream"] else "whole"
        lines.append(f"| {what} | {r['size'] / 1e6:.2f} MB | {r['direct_p50']:.1f} ms | "
                     f"{r['gateway_p50']:.1f} ms | {r['added_p50']:+.1f} ms | "
                     f"{r['gateway_max']:.1f} ms |")
    lines += ["", "The Kafka hop alone (produce with acks=all → a consumer has it), one message "
              "of the largest size:", "",
              "| compression | message | stored (approx.) | produce p50 | produce CPU p50 | "
              "hop p50 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for h in hops:
        lines.append(f"| {h['compression']} | {h['size'] / 1e6:.2f} MB | "
                     f"{h['stored'] / 1e6:.2f} MB | {h['produce_p50']:.1f} ms | "
                     f"{h['producer_cpu_p50']:.1f} ms | {h['hop_p50']:.1f} ms |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    async with single_upstream_gateway(lambda line: print(line, file=sys.stderr)) as served:
        rows = await through(served.url, served.fake_url, served.api_key, args.sizes,
                             args.requests)
        hops = await kafka_hop(served.settings.kafka, max(args.sizes), args.requests)
    section = render(rows, hops, ("python -m bench.large " + " ".join(sys.argv[1:])).strip(),
                     args.requests)
    print(section)
    write_section(RESULTS, START, END, section)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10, help="measured requests per cell")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[0, 1_000_000, 5_000_000], help="prompt sizes in bytes (0: small)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(_parse()))

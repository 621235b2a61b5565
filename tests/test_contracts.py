"""The contracts outside consumers rely on: the published usage schema, the commit rule of
the consumers, and the configuration reference in docs/configuration.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import orjson
from aiokafka import TopicPartition

from compose.gateway import Gateway
from tests.conftest import FakeAdmin
from tests.kafka_util import read_topic
from topics import names
from topics.messages import usage_json_schema
from topics.settings import Settings
from workers.consumer import OffsetTracker

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "topics/schemas/usage.v1.json"


def test_published_usage_schema_is_the_one_the_code_emits() -> None:
    assert orjson.loads(SCHEMA.read_bytes()) == usage_json_schema(), (
        "regenerate topics/schemas/usage.v1.json (docs/operations.md: 'Usage events') and bump the "
        "version if the change is not backward compatible")


async def test_usage_events_on_the_topic_validate_against_the_schema(
        gateway: Gateway, client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "schema check"}])
    request_id = completion._request_id

    def ours(records: list[Any]) -> list[dict[str, Any]]:
        # The topic is shared with the whole session, dead-letter tests' garbage included.
        events = []
        for record in records:
            try:
                event = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("request_id") == request_id:
                events.append(event)
        return events

    records = await read_topic(gateway.settings.kafka, names.USAGE,
                               lambda records: bool(ours(records)))
    event = ours(records)[0]
    jsonschema.validate(event, orjson.loads(SCHEMA.read_bytes()))
    assert isinstance(event["cost_usd"], str)  # money travels as a decimal string


def test_commit_point_is_the_end_of_the_finished_prefix() -> None:
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.start(tp, offset)
    tracker.start(other, 5)

    tracker.finish(tp, 11)
    tracker.finish(tp, 13)
    assert tracker.committable() == {}  # 10 is unfinished: nothing may be committed

    tracker.finish(tp, 10)
    assert tracker.committable() == {tp: 12}  # 10 and 11 done; 12 still running
    tracker.committed({tp: 12})
    assert tracker.committable() == {}

    tracker.finish(tp, 12)
    tracker.finish(other, 5)
    assert tracker.committable() == {tp: 14, other: 6}


def test_a_commit_that_failed_is_offered_again() -> None:
    # A commit refused mid-rebalance or timed out must not lose the position: on a quiet
    # partition nothing else would ever move the group's offset past that work.
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    tracker.start(tp, 7)
    tracker.finish(tp, 7)
    assert tracker.committable() == {tp: 8}
    assert tracker.committable() == {tp: 8}  # not confirmed yet: offered again
    tracker.committed({tp: 8})
    assert tracker.committable() == {}


def test_a_revoked_partition_is_never_committed_by_its_old_owner() -> None:
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    tracker.start(tp, 1)
    tracker.forget({tp})
    tracker.finish(tp, 1)  # the in-flight work finished after the revocation
    assert tracker.committable() == {}


def test_settings_survive_the_trip_through_a_child_environment(monkeypatch: Any) -> None:
    settings = Settings().model_copy(update={"fallback_upstream_url": "http://x:1/v1"})
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_configuration_reference_documents_every_setting() -> None:
    reference = (ROOT / "docs/configuration.md").read_text()
    documented = set(re.findall(r"`(SWITCHYARD_[A-Z_]+)`", reference))
    missing = set(Settings.env_names()) - documented
    assert not missing, f"docs/configuration.md lacks {sorted(missing)} (run `make docs`)"

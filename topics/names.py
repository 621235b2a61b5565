"""Topic and channel names. Constants only: these are the wire contract."""

from typing import Final

REQUESTS: Final = "llm.requests"
CLASSIFIED: Final = "llm.classified"
USAGE: Final = "llm.usage"
AUDIT: Final = "audit.events"
REPLIES: Final = "llm.replies"  # default reply topic for batch producers

# Consumer groups. Every consumer of llm.requests is in REQUESTS_GROUP, whether it forwards
# the labelled request to llm.classified (the classifier process) or routes it itself (a router
# that classifies inline): the partitions are shared between them, and a change of topology
# resumes where the other left off instead of replaying the topic.
REQUESTS_GROUP: Final = "classifier"
CLASSIFIED_GROUP: Final = "router"
USAGE_GROUP: Final = "usage"

CANCEL_CHANNEL: Final = "cancel"  # Redis pub/sub, broadcast to every router process
# Redis pub/sub, broadcast to every ingress process: session tokens revoked (state/sessions.py)
REVOKED_TOKENS_CHANNEL: Final = "sy:revoked-tokens"


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


def reply_channel(instance_id: str) -> str:
    """The Redis channel one ingress process reads all its replies from."""
    return f"reply.{instance_id}"


# Kafka header names (values are UTF-8 bytes).
H_REQUEST_ID: Final = "request-id"
H_TENANT_ID: Final = "tenant-id"
H_TRACEPARENT: Final = "traceparent"
H_CONTENT_TYPE: Final = "content-type"
H_DLQ_REASON: Final = "dlq-reason"
H_DLQ_SOURCE: Final = "dlq-source"
CONTENT_TYPE_JSON: Final = b"application/json"

"""Every process's logging: JSON lines (the default) or text (`SWITCHYARD_LOG_FORMAT`;
`switchyard up` uses text), on stderr through the standard library's logging.

A JSON line has `ts`, `level`, `logger`, `message`, `process`, and when known `trace_id`,
`span_id` (the current span's, or with tracing off the request's trace as it travels,
`topics/tracing.py`) and `request_id`; `exc_info` when the record has one. Nothing is added
that the message does not say: secrets are never logged by the code that logs."""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any, Literal

import orjson
from opentelemetry import trace

from topics.tracing import current_request_id

LogFormat = Literal["json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "process": self._process}
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = f"{span.trace_id:032x}"
            out["span_id"] = f"{span.span_id:016x}"
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def logging_config(process: str, level: str, fmt: LogFormat) -> dict[str, Any]:
    """The `logging.config.dictConfig` of a process: one stderr handler on the root logger, in
    `fmt`; uvicorn's loggers pass their records to it. uvicorn applies it in each of its worker
    processes too (its `log_config`)."""
    formatter: dict[str, Any] = ({"()": JsonFormatter, "process": process} if fmt == "json"
                                 else {"format": TEXT_FORMAT})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"switchyard": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "switchyard"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure_logging(process: str, level: str, fmt: LogFormat) -> None:
    """The root logger's one handler (stderr), in `fmt`; replaces any configured before."""
    logging.config.dictConfig(logging_config(process, level, fmt))

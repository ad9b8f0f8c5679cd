"""Logging: plain text for people, or JSON lines (`log_format: json`) for log pipelines.

Errors about a record carry its coordinates (topic, partition, offset, key) as structured fields,
passed with `extra=record_fields(source)`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

COORDINATES = ("topic", "partition", "offset", "key", "reason", "stage", "model")


def record_fields(source: Any, **more: Any) -> dict[str, Any]:
    """`extra=` for a log call about one input record (a streams.schemas.SourceRecord)."""
    key = source.key.decode("utf-8", "replace") if isinstance(source.key, bytes) else source.key
    return {"topic": source.topic, "partition": source.partition, "offset": source.offset, "key": key, **more}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in COORDINATES if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A logging.config.dictConfig for the worker (Faust applies it at start-up)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, not {fmt!r}")
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }

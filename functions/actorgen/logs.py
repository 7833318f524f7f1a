"""Structured logs that Cloud Logging can filter, for the functions and the trainer.

Cloud Run functions (2nd gen) and Vertex AI custom jobs turn each line their
process writes that is one JSON object into a log entry: ``severity`` becomes
the entry's severity, ``message`` its text, and every other key a field of
``jsonPayload``. This module installs a handler on the standard ``logging``
root that writes exactly such lines (the same shape as the functions SDK's
``firebase_functions.logger``, which cannot take ``logging`` records), so
every existing ``log.info(...)`` call stays as it is.

Every line carries the same four keys, from :func:`context` (a ``ContextVar``
set once at each function's entry and around each job of a pass), ``null``
when the line is not about one job::

    jsonPayload.jobId="job-123"  jsonPayload.userId="uid"  jsonPayload.attempt=2
    jsonPayload.function="dispatch_jobs"  severity>=WARNING

Secrets never leave: Hugging Face tokens, bearer tokens, Google access tokens
and any value passed to :func:`register_secret` are replaced by ``***`` in the
message and in exception texts before the line is written.

Cheap to import (json, re, contextvars): the functions load it at cold start.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Final, TextIO

#: The keys every line carries (jsonPayload fields), in the order they are written.
JOB_ID: Final = "jobId"
ATTEMPT: Final = "attempt"
USER_ID: Final = "userId"
FUNCTION: Final = "function"
CONTEXT_KEYS: Final = (JOB_ID, ATTEMPT, USER_ID, FUNCTION)
SOURCE_LOCATION: Final = "logging.googleapis.com/sourceLocation"

#: Loggers of this project that log at INFO (libraries stay at the root's WARNING).
PROJECT_LOGGERS: Final = ("actorgen", "lora_trainer", "tools")

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "actorgen_log_context", default={}
)
#: Process-wide values under every context (the trainer's function name, its job).
_defaults: dict[str, Any] = {}

_REDACTED: Final = "***"
_PATTERNS: Final = (
    # Authorization headers and bearer tokens, however they were printed (first, so
    # that the whole credential goes, whatever its shape).
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 " + _REDACTED),
    (re.compile(r"(?i)(\bauthorization['\"]?\s*[:=]\s*['\"]?)(?!bearer\b)[^\s'\",}]+"),
     r"\1" + _REDACTED),
    # Hugging Face user access tokens: hf_ followed by ~34 letters and digits.
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_" + _REDACTED),
    # Google OAuth access tokens.
    (re.compile(r"\bya29\.[A-Za-z0-9._\-]+"), "ya29." + _REDACTED),
    # token=... / access_token=... in URLs and key=value texts.
    (re.compile(r"(?i)\b((?:access_|id_|refresh_)?token=)[^&\s'\"]+"), r"\1" + _REDACTED),
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()

_SEVERITIES: Final = (
    (logging.CRITICAL, "CRITICAL"),
    (logging.ERROR, "ERROR"),
    (logging.WARNING, "WARNING"),
    (logging.INFO, "INFO"),
)


def _key(name: str) -> str:
    """``job_id`` -> ``jobId``: callers use Python names, lines the schema's."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _fields(values: Mapping[str, Any]) -> dict[str, Any]:
    fields = {_key(k): v for k, v in values.items()}
    unknown = set(fields) - set(CONTEXT_KEYS)
    if unknown:
        raise TypeError(f"unknown log context keys: {sorted(unknown)}; use {CONTEXT_KEYS}")
    return fields


@contextlib.contextmanager
def context(**values: Any) -> Iterator[None]:
    """Put ``job_id``, ``attempt``, ``user_id`` and/or ``function`` on every line inside."""
    token = _context.set({**_context.get(), **_fields(values)})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**values: Any) -> None:
    """Add context to the current one until it ends (e.g. the user, once a job is read)."""
    _context.set({**_context.get(), **_fields(values)})


def set_defaults(**values: Any) -> None:
    """Process-wide context under every :func:`context` (a trainer process is one job)."""
    _defaults.update(_fields(values))


def current() -> dict[str, Any]:
    """The context a line written now would carry (every key, None when unknown)."""
    merged = {**_defaults, **_context.get()}
    return {key: merged.get(key) for key in CONTEXT_KEYS}


def register_secret(value: str | None) -> None:
    """Never write ``value`` (e.g. the Hugging Face token read from Secret Manager)."""
    if value and len(value) >= 8:  # a short value would blank out ordinary words
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` without secrets: registered values and known token shapes become ``***``."""
    for secret in tuple(_secrets):
        text = text.replace(secret, _REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def severity(levelno: int) -> str:
    """Cloud Logging's LogSeverity for a ``logging`` level (custom levels round down)."""
    for threshold, name in _SEVERITIES:
        if levelno >= threshold:
            return name
    return "DEBUG"


def as_text(line: str) -> str:
    """A structured line as ``SEVERITY message`` for a person (error tails); others as is."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        if isinstance(entry, dict) and "message" in entry:
            return f"{entry.get('severity', 'DEFAULT')} {entry['message']}"
    return line


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per record, in Cloud Logging's structured-logging shape."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # The traceback in the message is what Error Reporting groups errors by.
            message = f"{message}\n{self.formatException(record.exc_info)}"
        elif record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        entry: dict[str, Any] = {
            "severity": severity(record.levelno),
            "message": redact(message),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "logger": record.name,
            **current(),
            SOURCE_LOCATION: {
                "file": record.pathname,
                "line": str(record.lineno),
                "function": record.funcName,
            },
        }
        return json.dumps(entry, ensure_ascii=False, default=str)


class RedactingTextFormatter(logging.Formatter):
    """Plain text for a person at a terminal (``--log-format text``), secrets removed too."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        known = " ".join(f"{k}={v}" for k, v in current().items() if v is not None)
        text = super().format(record)
        return redact(f"[{known}] {text}" if known else text)


class _StructuredHandler(logging.StreamHandler):
    """Marks the handler :func:`install` owns, so a second install replaces it."""


def install(*, function: str | None = None, level: int | str = logging.INFO,
            stream: TextIO | None = None, json_lines: bool = True) -> logging.Handler:
    """Write every log record as one JSON line to ``stream`` (default: stdout).

    Idempotent: a second call replaces the first handler. The project's own
    loggers log from ``level``; other libraries keep the root's level (WARNING).
    ``function`` names the process for every line (e.g. ``lora_trainer``).
    ``json_lines=False`` writes redacted plain text instead (local runs).
    """
    if function is not None:
        set_defaults(function=function)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StructuredHandler):
            root.removeHandler(handler)
    handler = _StructuredHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(CloudLoggingFormatter() if json_lines else RedactingTextFormatter())
    root.addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level.upper() if isinstance(level, str) else level)
    return handler

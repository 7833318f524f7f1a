"""Structured log lines: what Cloud Logging receives, parsed back as it would parse them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from actorgen import logs

HF_TOKEN = "hf_" + "Ab3dE6gH9jK2mN5pQ8rS1tU4vW7xY0zA2c"  # the shape of a real one
GOOGLE_TOKEN = "ya29.a0AfB_byC-secretsecret"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """The structured handler on a buffer; everything it installed is removed after."""
    levels = {name: logging.getLogger(name).level for name in logs.PROJECT_LOGGERS}
    stream = io.StringIO()
    handler = logs.install(stream=stream)
    saved = dict(logs._defaults)
    logs._defaults.clear()
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)
        logs._defaults.clear()
        logs._defaults.update(saved)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    # Every line must be one JSON object, or Cloud Logging keeps it as plain text.
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_has_job_attempt_user_and_function(lines: io.StringIO) -> None:
    log = logging.getLogger("actorgen.dispatch")
    log.info("before any context")
    with logs.context(function="dispatch_jobs"):
        log.info("pass started")
        with logs.context(job_id="job-1", user_id="uid-1", attempt=2):
            log.warning("claimed %s", "job-1")
        log.info("pass ended")
    out = parsed(lines)
    assert [e["message"] for e in out] == [
        "before any context", "pass started", "claimed job-1", "pass ended"]
    for entry in out:
        assert set(logs.CONTEXT_KEYS) <= set(entry)
    assert [(e["jobId"], e["attempt"], e["userId"], e["function"]) for e in out] == [
        (None, None, None, None),
        (None, None, None, "dispatch_jobs"),
        ("job-1", 2, "uid-1", "dispatch_jobs"),
        (None, None, None, "dispatch_jobs"),  # the inner context ended with its block
    ]
    assert out[2]["logger"] == "actorgen.dispatch"
    assert out[2]["logging.googleapis.com/sourceLocation"]["function"] == (
        "test_every_line_has_job_attempt_user_and_function")
    assert out[2]["time"].endswith("Z")


def test_bind_adds_to_the_context_until_it_ends(lines: io.StringIO) -> None:
    log = logging.getLogger("actorgen.intake")
    with logs.context(function="intake_job", job_id="j9"):
        logs.bind(user_id="u9")  # known only once the job was read
        log.info("queued")
    log.info("outside")
    first, second = parsed(lines)
    assert (first["jobId"], first["userId"]) == ("j9", "u9")
    assert (second["jobId"], second["userId"]) == (None, None)
    with pytest.raises(TypeError, match="unknown log context keys"):
        logs.bind(job="typo")


def test_severity_is_mapped_and_project_loggers_log_info(lines: io.StringIO) -> None:
    log = logging.getLogger("actorgen.reconcile")
    log.debug("not at INFO")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    log.log(25, "between INFO and WARNING")
    logging.getLogger("urllib3.connectionpool").info("a library's chatter stays out")
    logging.getLogger("urllib3.connectionpool").warning("a library's warning comes in")
    assert [(e["severity"], e["message"]) for e in parsed(lines)] == [
        ("INFO", "i"), ("WARNING", "w"), ("ERROR", "e"), ("CRITICAL", "c"),
        ("INFO", "between INFO and WARNING"), ("WARNING", "a library's warning comes in"),
    ]


def test_no_secret_is_ever_written(lines: io.StringIO) -> None:
    log = logging.getLogger("lora_trainer.models")
    registered = "s3cr3t-from-secret-manager"
    logs.register_secret(registered)
    log.warning("download failed: 401 for Authorization: Bearer %s", HF_TOKEN)
    log.info("token %s and header authorization=%s", HF_TOKEN, GOOGLE_TOKEN)
    log.info("url https://example.test/x?access_token=abc123&b=1 and %s", registered)
    try:
        raise RuntimeError(f"hub said no to {HF_TOKEN}")
    except RuntimeError:
        log.exception("push failed")
    text = lines.getvalue()
    for secret in (HF_TOKEN, GOOGLE_TOKEN, "abc123", registered):
        assert secret not in text
    out = parsed(lines)
    assert out[0]["message"] == "download failed: 401 for Authorization: Bearer ***"
    assert "token hf_*** and header authorization=***" == out[1]["message"]
    assert out[2]["message"] == "url https://example.test/x?access_token=***&b=1 and ***"
    # The traceback is in the message (Error Reporting reads it there), scrubbed too.
    assert out[3]["severity"] == "ERROR"
    assert "Traceback" in out[3]["message"] and "hub said no to hf_***" in out[3]["message"]
    # Ordinary words that only look a little like secrets survive.
    assert logs.redact("set HF_TOKEN_SECRET=hf-token; hf_push off") == (
        "set HF_TOKEN_SECRET=hf-token; hf_push off")


def test_install_twice_keeps_one_handler(lines: io.StringIO) -> None:
    other = io.StringIO()
    handler = logs.install(stream=other)
    try:
        logging.getLogger("actorgen").info("once")
        assert lines.getvalue() == "" and len(parsed(other)) == 1
    finally:
        logging.getLogger().removeHandler(handler)


def test_text_format_is_redacted_too() -> None:
    levels = {name: logging.getLogger(name).level for name in logs.PROJECT_LOGGERS}
    stream = io.StringIO()
    handler = logs.install(stream=stream, json_lines=False)
    try:
        with logs.context(job_id="j1", attempt=1):
            logging.getLogger("lora_trainer").info("token %s", HF_TOKEN)
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert HF_TOKEN not in stream.getvalue()
    assert "[jobId=j1 attempt=1]" in stream.getvalue()


def test_an_error_tail_reads_as_text(lines: io.StringIO) -> None:
    # The local executor quotes the trainer's last lines when it dies without a word.
    logging.getLogger("lora_trainer.run").error("training failed: out of memory")
    [line] = lines.getvalue().splitlines()
    assert logs.as_text(line) == "ERROR training failed: out of memory"
    assert logs.as_text("RuntimeError: CUDA out of memory") == "RuntimeError: CUDA out of memory"
    assert logs.as_text("{not json") == "{not json"

"""What the operator command line shows, computed from plain documents (pure, no I/O).

Every function here takes job or actor dicts as Firestore returns them and gives
back plain values (for ``--json``) or text lines; the commands in
:mod:`actorgen.cli.main` only fetch documents and print.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from actorgen import jobs, schema
from actorgen.schema import AttemptField, Field, JobStatus, ModelVersionField, StatusChangeField

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: Statuses after which ``follow`` stops: final ones, and failed (final unless an admin
#: re-dispatches it).
ENDED_STATUSES = schema.FINAL_JOB_STATUSES | {JobStatus.FAILED}

#: The job fields ``jobs`` lists (and ``--json`` returns for each job).
LIST_FIELDS = (
    Field.STATUS, Field.PROGRESS, Field.ATTEMPT, Field.USER_ID, Field.ACTOR_ID,
    Field.CREATED_AT, Field.UPDATED_AT, Field.GPU_SECONDS, Field.ESTIMATED_COST_USD, Field.ERROR,
)


class UsageError(ValueError):
    """A bad command-line value; the message says what to use instead."""


def parse_age(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w`` as a timedelta; UsageError says the format."""
    match = _AGE.match(text)
    if not match:
        raise UsageError(f"{text[:20]!r} is not an age: use a number and a unit, e.g. 90s, 15m, 2h, 7d, 1w")
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def plain(value: Any) -> Any:
    """``value`` with datetimes as ISO 8601 strings, for JSON output."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def duration(seconds: float | None) -> str:
    """``3h04m``, ``12m05s``, ``42s``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def age(at: Any, now: datetime) -> float | None:
    when = jobs.as_datetime(at)
    return None if when is None else (now - when).total_seconds()


def usd(value: Any) -> str:
    return f"${value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------- jobs
def job_row(job_id: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """One job as ``jobs`` lists it."""
    return {"id": job_id, **{name: job.get(name) for name in LIST_FIELDS}}


def jobs_table(rows: Sequence[Mapping[str, Any]], now: datetime) -> list[str]:
    header = ("JOB", "STATUS", "PROG", "TRY", "USER", "ACTOR", "AGE", "GPU", "COST")
    lines = [
        (
            str(r["id"]),
            str(r.get(Field.STATUS) or JobStatus.PENDING),
            f"{int(number(r.get(Field.PROGRESS)) or 0)}%",
            str(jobs.as_int(r.get(Field.ATTEMPT))),
            _short(r.get(Field.USER_ID)),
            _short(r.get(Field.ACTOR_ID)),
            duration(age(r.get(Field.CREATED_AT), now)),
            duration(number(r.get(Field.GPU_SECONDS))) if r.get(Field.GPU_SECONDS) else "-",
            usd(r.get(Field.ESTIMATED_COST_USD)),
        )
        for r in rows
    ]
    return _table(header, lines)


def _short(value: Any, width: int = 20) -> str:
    text = str(value or "-")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def timeline(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every status with its time: ``statusHistory``, or the job's timestamps for
    documents written before the history existed (marked ``derived``)."""
    raw = job.get(Field.STATUS_HISTORY)
    if isinstance(raw, list) and raw:
        return [
            {"status": e.get(StatusChangeField.STATUS), "at": jobs.as_datetime(e.get(StatusChangeField.AT))}
            for e in raw if isinstance(e, Mapping)
        ]
    derived = [
        (JobStatus.PENDING, Field.CREATED_AT),
        (JobStatus.QUEUED, Field.QUEUED_AT),
        (JobStatus.DISPATCHED, Field.DISPATCHED_AT),
        (JobStatus.PREPARING, Field.STARTED_AT),
    ]
    out = [
        {"status": status, "at": jobs.as_datetime(job.get(name)), "derived": True}
        for status, name in derived if job.get(name) is not None
    ]
    status = job.get(Field.STATUS) or JobStatus.PENDING
    if status in ENDED_STATUSES and job.get(Field.FINISHED_AT) is not None:
        out.append({"status": status, "at": jobs.as_datetime(job.get(Field.FINISHED_AT)),
                    "derived": True})
    elif not out or out[-1]["status"] != status:
        out.append({"status": status, "at": jobs.as_datetime(job.get(Field.UPDATED_AT)),
                    "derived": True})
    return out


def attempts(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every attempt with its executor job and how it ended; the current one last."""
    out = [
        {
            "attempt": e.get(AttemptField.ATTEMPT),
            "executorJobName": e.get(AttemptField.EXECUTOR_JOB_NAME),
            "outcome": e.get(AttemptField.OUTCOME),
            "error": e.get(AttemptField.ERROR),
            "endedAt": jobs.as_datetime(e.get(AttemptField.ENDED_AT)),
        }
        for e in jobs.history(job)
    ]
    current = jobs.as_int(job.get(Field.ATTEMPT))
    recorded = {(e["attempt"], e["executorJobName"]) for e in out}
    name = job.get(Field.EXECUTOR_JOB_NAME)
    if current >= 1 and name and (current, name) not in recorded:
        out.append({
            "attempt": current,
            "executorJobName": name,
            "outcome": None,
            "executorState": job.get(Field.EXECUTOR_STATE),
            "error": None,
            "endedAt": None,
        })
    return out


def job_detail(job_id: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """Everything ``job ID`` shows, as plain values."""
    return {
        "id": job_id,
        "status": job.get(Field.STATUS) or JobStatus.PENDING,
        "error": job.get(Field.ERROR),
        "userId": job.get(Field.USER_ID),
        "actorId": job.get(Field.ACTOR_ID),
        "baseModelId": job.get(Field.BASE_MODEL_ID),
        "priority": job.get(Field.PRIORITY),
        "progress": job.get(Field.PROGRESS),
        "step": job.get(Field.STEP),
        "totalSteps": job.get(Field.TOTAL_STEPS),
        "attempt": job.get(Field.ATTEMPT),
        "maxAttempts": job.get(Field.MAX_ATTEMPTS),
        "executor": job.get(Field.EXECUTOR),
        "cancelRequested": bool(job.get(Field.CANCEL_REQUESTED)),
        "timeline": timeline(job),
        "attempts": attempts(job),
        "timings": job.get(Field.TIMINGS) or {},
        "metrics": job.get(Field.METRICS) or {},
        "artifacts": job.get(Field.ARTIFACTS) or {},
        "trainedModelId": job.get(Field.TRAINED_MODEL_ID),
        "modelVersion": job.get(Field.MODEL_VERSION),
        "gpuSeconds": job.get(Field.GPU_SECONDS),
        "estimatedCostUsd": job.get(Field.ESTIMATED_COST_USD),
    }


def job_lines(detail: Mapping[str, Any]) -> list[str]:
    """``job ID`` as text."""
    lines = [f"job {detail['id']}: {detail['status']}"]
    if detail.get("error"):
        lines.append(f"  error: {detail['error']}")
    for label, key in (("user", "userId"), ("actor", "actorId"), ("base model", "baseModelId"),
                       ("executor", "executor")):
        if detail.get(key):
            lines.append(f"  {label}: {detail[key]}")
    progress = detail.get("progress")
    if progress is not None:
        step = f", step {detail['step']}/{detail['totalSteps']}" if detail.get("totalSteps") else ""
        lines.append(f"  progress: {progress}%{step}")
    lines.append(f"  attempt: {detail.get('attempt') or 0} of {detail.get('maxAttempts') or '-'}")
    cost = usd(detail.get("estimatedCostUsd"))
    lines.append(f"  GPU time: {duration(number(detail.get('gpuSeconds')))}, estimated cost: {cost}")
    lines.append("timeline:")
    previous: datetime | None = None
    for entry in detail["timeline"]:
        at = entry.get("at")
        step = f" (+{duration((at - previous).total_seconds())})" if at and previous else ""
        mark = "  ~" if entry.get("derived") else ""
        lines.append(f"  {_time(at)}  {entry['status']}{step}{mark}")
        previous = at or previous
    if any(e.get("derived") for e in detail["timeline"]):
        lines.append("  (~ from the job's timestamps: it has no statusHistory)")
    if detail["attempts"]:
        lines.append("attempts:")
        for a in detail["attempts"]:
            outcome = a.get("outcome") or f"running ({a.get('executorState') or '?'})"
            lines.append(f"  #{a.get('attempt')}  {outcome}  {_time(a.get('endedAt'))}")
            if a.get("executorJobName"):
                lines.append(f"      executor job: {a['executorJobName']}")
            if a.get("error"):
                lines.append(f"      error: {_one_line(a['error'])}")
    for title in ("timings", "metrics", "artifacts"):
        values = detail.get(title) or {}
        if values:
            lines.append(f"{title}:")
            lines.extend(f"  {k}: {_value(v)}" for k, v in sorted(values.items()))
    return lines


def _time(at: Any) -> str:
    when = jobs.as_datetime(at)
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else "-" * 19


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _one_line(text: Any, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ----------------------------------------------------------------------------- follow
def progress_line(job: Mapping[str, Any], width: int = 30) -> str:
    """``[#########.....]  45%  training  step 360/800  loss 0.1234  eta 3m12s``."""
    status = job.get(Field.STATUS) or JobStatus.PENDING
    pct = max(0.0, min(100.0, number(job.get(Field.PROGRESS)) or 0.0))
    filled = int(round(width * pct / 100))
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {pct:3.0f}%", status]
    if job.get(Field.TOTAL_STEPS):
        parts.append(f"step {jobs.as_int(job.get(Field.STEP))}/{jobs.as_int(job.get(Field.TOTAL_STEPS))}")
    loss = number(job.get(Field.LOSS))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    eta = number(job.get(Field.ETA_SECONDS))
    if eta is not None and status not in ENDED_STATUSES:
        parts.append(f"eta {duration(eta)}")
    return "  ".join(parts)


def follow_state(job: Mapping[str, Any]) -> dict[str, Any]:
    """What one ``follow --json`` line holds."""
    return {
        "status": job.get(Field.STATUS) or JobStatus.PENDING,
        "progress": job.get(Field.PROGRESS),
        "step": job.get(Field.STEP),
        "totalSteps": job.get(Field.TOTAL_STEPS),
        "loss": job.get(Field.LOSS),
        "etaSeconds": job.get(Field.ETA_SECONDS),
        "attempt": job.get(Field.ATTEMPT),
        "error": job.get(Field.ERROR),
    }


# ----------------------------------------------------------------------------- models
def model_versions(actor: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = actor.get(Field.MODEL_VERSIONS)
    versions = [dict(v) for v in raw if isinstance(v, Mapping)] if isinstance(raw, list) else []
    versions.sort(key=lambda v: jobs.as_int(v.get(ModelVersionField.VERSION)))
    return versions


def models_lines(actor_id: str, actor: Mapping[str, Any], versions: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        f"actor {actor_id}: modelStatus {actor.get(Field.MODEL_STATUS) or '-'}, "
        f"current model {actor.get(Field.MODEL_ID) or '-'}"
    ]
    if not versions:
        lines.append("  no model versions")
    for v in versions:
        lines.append(
            f"v{v.get(ModelVersionField.VERSION)}  model {v.get(ModelVersionField.MODEL_ID)}  "
            f"job {v.get(ModelVersionField.JOB_ID)}  {_time(v.get(ModelVersionField.CREATED_AT))}"
        )
        lines.append(f"    base {v.get(ModelVersionField.BASE_MODEL_ID)}  trigger "
                     f"{v.get(ModelVersionField.TRIGGER)!r}")
        if v.get(ModelVersionField.HUB_REPO):
            lines.append(f"    hub repo {v[ModelVersionField.HUB_REPO]}")
        files = v.get("files")
        if files is not None:
            for f in files:
                lines.append(f"    {f['size']:>12,}  {f['path']}")
            if not files:
                lines.append("    (no files in the bucket)")
        else:
            for name, path in sorted((v.get(ModelVersionField.ARTIFACTS) or {}).items()):
                lines.append(f"    {name}: {path}")
    return lines


# ----------------------------------------------------------------------------- stats
def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"count": len(ordered), "median": statistics.median(ordered), "p90": p90,
            "max": ordered[-1]}


def _queue_wait(job: Mapping[str, Any]) -> float | None:
    """Seconds from the first ``queued`` to the first ``dispatching`` (or dispatched)."""
    queued = dispatched = None
    for entry in timeline(job):
        if entry["status"] == JobStatus.QUEUED and queued is None:
            queued = entry["at"]
        if entry["status"] in (JobStatus.DISPATCHING, JobStatus.DISPATCHED) and dispatched is None:
            dispatched = entry["at"]
    if queued is None or dispatched is None:
        return None
    return max(0.0, (dispatched - queued).total_seconds())


def stats(
    period_jobs: Iterable[Mapping[str, Any]],
    queued_now: Iterable[Mapping[str, Any]],
    now: datetime,
    since: datetime,
) -> dict[str, Any]:
    """Jobs per status, queue age, attempts per job, GPU seconds and estimated cost.

    ``period_jobs`` are the jobs created since ``since``; ``queued_now`` the jobs
    queued at this moment, whatever their age (the queue as it is now).
    """
    period = list(period_jobs)
    per_status = Counter(str(j.get(Field.STATUS) or JobStatus.PENDING) for j in period)
    tries = [jobs.as_int(j.get(Field.ATTEMPT)) for j in period if jobs.as_int(j.get(Field.ATTEMPT)) >= 1]
    gpu = [number(j.get(Field.GPU_SECONDS)) for j in period]
    cost = [number(j.get(Field.ESTIMATED_COST_USD)) for j in period]
    completed_cost = [
        c for j, c in zip(period, cost) if c is not None and j.get(Field.STATUS) == JobStatus.COMPLETED
    ]
    queue = list(queued_now)
    ages = [a for a in (age(j.get(Field.QUEUED_AT), now) for j in queue) if a is not None]
    waiting = sum(
        1 for j in queue
        if (jobs.as_datetime(j.get(Field.NEXT_ATTEMPT_AT)) or now) > now
    )
    return {
        "since": since,
        "until": now,
        "jobs": len(period),
        "perStatus": dict(sorted(per_status.items())),
        "queue": {
            "queued": len(queue),
            "inBackoff": waiting,
            "oldestAgeSeconds": max(ages) if ages else None,
            "waitSeconds": _quantiles([w for w in map(_queue_wait, period) if w is not None]),
        },
        "attempts": {
            "jobsDispatched": len(tries),
            "mean": statistics.fmean(tries) if tries else None,
            "max": max(tries) if tries else None,
            "histogram": {str(k): v for k, v in sorted(Counter(tries).items())},
        },
        "gpuSeconds": sum(g for g in gpu if g is not None),
        "estimatedCostUsd": round(sum(c for c in cost if c is not None), 6),
        "jobsWithoutCostEstimate": sum(
            1 for g, c in zip(gpu, cost) if g is not None and g > 0 and c is None
        ),
        "meanCostPerCompletedJobUsd": statistics.fmean(completed_cost) if completed_cost else None,
    }


def stats_lines(s: Mapping[str, Any]) -> list[str]:
    since, until = s["since"], s["until"]
    lines = [f"jobs created {_time(since)} .. {_time(until)} UTC: {s['jobs']}"]
    for status, count in s["perStatus"].items():
        lines.append(f"  {status:<12} {count}")
    q = s["queue"]
    lines.append(
        f"queue now: {q['queued']} queued ({q['inBackoff']} in backoff), oldest "
        f"{duration(q['oldestAgeSeconds'])}"
    )
    w = q["waitSeconds"]
    if w["count"]:
        lines.append(
            f"queue wait (queued -> dispatched): median {duration(w['median'])}, p90 "
            f"{duration(w['p90'])}, max {duration(w['max'])} over {w['count']} jobs"
        )
    a = s["attempts"]
    if a["jobsDispatched"]:
        hist = ", ".join(f"{k}: {v}" for k, v in a["histogram"].items())
        lines.append(f"attempts per dispatched job: mean {a['mean']:.2f}, max {a['max']} ({hist})")
    lines.append(
        f"GPU time: {duration(s['gpuSeconds'])} ({s['gpuSeconds']:.0f} s), estimated cost "
        f"{usd(s['estimatedCostUsd'])}"
    )
    if s["meanCostPerCompletedJobUsd"] is not None:
        lines.append(f"  per completed job: {usd(s['meanCostPerCompletedJobUsd'])}")
    if s["jobsWithoutCostEstimate"]:
        lines.append(f"  {s['jobsWithoutCostEstimate']} jobs with GPU time but no estimate "
                     "(no GPU_PRICES entry for their machine)")
    return lines

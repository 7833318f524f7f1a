"""``actorgen``: the operator's command line (jobs, timelines, follow, re-dispatch, cancel,
models, stats).

Works against the Local Emulator Suite when ``FIRESTORE_EMULATOR_HOST`` (and
``STORAGE_EMULATOR_HOST`` for ``models``) are set, otherwise against the project
named by ``--project`` (or ``GOOGLE_CLOUD_PROJECT``) with application-default
credentials (``gcloud auth application-default login``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from actorgen import schema
from actorgen.cli import views
from actorgen.schema import Field, JobStatus

EXIT_OK = 0
EXIT_ERROR = 1  # Firestore/Storage unreachable, no credentials, anything unexpected
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4  # the pipeline's rules do not allow the request
EXIT_NOT_COMPLETED = 5  # follow: the job ended failed, rejected or cancelled
EXIT_TIMEOUT = 6  # follow, or waiting for the trigger to act, ran out of time

EXIT_CODES = f"""exit codes:
  {EXIT_OK}  done (follow: the job completed)
  {EXIT_ERROR}  error (Firestore or Storage unreachable, no credentials...)
  {EXIT_USAGE}  bad arguments
  {EXIT_NOT_FOUND}  no such job or actor
  {EXIT_REFUSED}  refused by the pipeline's rules (e.g. re-dispatch of a job that is not failed)
  {EXIT_NOT_COMPLETED}  follow: the job ended failed, rejected or cancelled
  {EXIT_TIMEOUT}  timed out (follow, or waiting for the on_job_updated function to act)
"""

TARGET = """target:
  emulators   export FIRESTORE_EMULATOR_HOST=127.0.0.1:8080 (and STORAGE_EMULATOR_HOST=
              http://127.0.0.1:9199 for `models`) GCLOUD_PROJECT=demo-actorgen
  a project   --project PROJECT (or GOOGLE_CLOUD_PROJECT) with application-default
              credentials: gcloud auth application-default login
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the options work before or after the command without overwriting.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (follow: one JSON object per line)")
    common.add_argument("--project", default=argparse.SUPPRESS,
                        help="Google Cloud / Firebase project id (default: GOOGLE_CLOUD_PROJECT)")
    common.add_argument("--rpc-timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="give up on an unreachable Firestore after this long (default 30)")
    common.add_argument("--bucket", default=argparse.SUPPRESS,
                        help="Storage bucket of the models (default: ACTORGEN_BUCKET, "
                        "FIREBASE_CONFIG's, else PROJECT.appspot.com)")
    parser = argparse.ArgumentParser(
        prog="actorgen",
        description="Operate the actor LoRA pipeline: list and inspect training jobs, follow\n"
        "one live, re-dispatch or cancel through the pipeline's own rules, list an\n"
        "actor's models, and see queue, attempt and cost statistics.",
        epilog=TARGET + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common],
                                   epilog=EXIT_CODES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("jobs", "List training jobs, newest first.")
    p.add_argument("--status", action="append", default=[], metavar="STATUS",
                   help="only these statuses (repeat or comma-separate): "
                   + ", ".join(sorted(schema.ALL_JOB_STATUSES)))
    p.add_argument("--user", help="only this user's jobs (userId)")
    p.add_argument("--actor", help="only this actor's jobs (actorId)")
    p.add_argument("--since", metavar="AGE", help="created within AGE, e.g. 2h, 7d")
    p.add_argument("--older-than", metavar="AGE", help="created more than AGE ago, e.g. 30m")
    p.add_argument("--limit", type=_positive_int, default=50, help="most jobs shown (default 50)")

    p = command("job", "Show one job: timeline, attempts, timings, metrics, artifacts, cost.")
    p.add_argument("job_id", metavar="ID")

    p = command("follow", "Show a job's live progress until it ends.")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reads (default 2)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="give up after this many seconds (default 0: never)")

    for name, text in (
        ("redispatch", "Re-dispatch a failed job (what setting status failed -> queued in the "
                       "console does; the on_job_updated function grants a fresh attempt budget)."),
        ("cancel", "Cancel a job (sets cancelRequested as the app does; the on_job_updated "
                   "function stops its executor job and ends it cancelled)."),
    ):
        p = command(name, text)
        p.add_argument("job_id", metavar="ID")
        p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                       help="wait this long for the function to act (default 60; 0: do not wait)")

    p = command("models", "List an actor's model versions with their files.")
    p.add_argument("actor_id", metavar="ACTOR")
    p.add_argument("--no-files", action="store_true",
                   help="do not list the files in the bucket (documents only)")

    p = command("stats", "Jobs per status, queue age, attempts per job, GPU time and "
                         "estimated cost over a period.")
    p.add_argument("--since", metavar="AGE", default="7d",
                   help="the period: jobs created within AGE (default 7d)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


class Output:
    """Where results and messages go (stdout / stderr), text or JSON."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json, self.out, self.err = as_json, out, err

    def result(self, value: Any, lines: Sequence[str] = ()) -> None:
        if self.as_json:
            print(json.dumps(views.plain(value), sort_keys=True), file=self.out, flush=True)
        else:
            for line in lines:
                print(line, file=self.out)
            self.out.flush()

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run one command; returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Output(getattr(args, "json", False), out, err)
    project = getattr(args, "project", None)
    if project:
        # Read by actorgen.clients when it creates the app (below, on first use).
        os.environ["GOOGLE_CLOUD_PROJECT"] = project
        os.environ["GCLOUD_PROJECT"] = project
    from actorgen.cli import store

    store.set_rpc_timeout(getattr(args, "rpc_timeout", store.DEFAULT_RPC_TIMEOUT_SECONDS))
    try:
        return COMMANDS[args.command](args, output)
    except store.NotFound as exc:
        output.note(f"actorgen {args.command}: {exc}")
        return EXIT_NOT_FOUND
    except (store.Refused, schema.InvalidTransition) as exc:
        output.note(f"actorgen {args.command}: refused: {exc}")
        return EXIT_REFUSED
    except views.UsageError as exc:  # bad ages and similar: the message says what to use
        output.note(f"actorgen {args.command}: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        output.note(f"actorgen {args.command}: {type(exc).__name__}: {_short(str(exc))}")
        if not _target_known():
            output.note("no emulator host and no project: pass --project or set "
                        "FIRESTORE_EMULATOR_HOST (see actorgen --help)")
        return EXIT_ERROR


def _short(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _target_known() -> bool:
    from actorgen import clients

    return clients.using_emulators() or bool(clients.project_id())


def _db() -> Any:
    from actorgen import clients

    return clients.firestore_client()


def _now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- commands
def cmd_jobs(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    statuses = [s.strip() for value in args.status for s in value.split(",") if s.strip()]
    unknown = sorted(set(statuses) - schema.ALL_JOB_STATUSES)
    if unknown:
        raise views.UsageError(f"unknown status {unknown[0][:30]!r}; use one of "
                         + ", ".join(sorted(schema.ALL_JOB_STATUSES)))
    now = _now()
    found = store.list_jobs(
        _db(),
        statuses=statuses,
        user=args.user,
        actor=args.actor,
        created_after=now - views.parse_age(args.since) if args.since else None,
        created_before=now - views.parse_age(args.older_than) if args.older_than else None,
        limit=args.limit,
    )
    rows = [views.job_row(job_id, job) for job_id, job in found]
    output.result(rows, views.jobs_table(rows, now) if rows else ["no jobs match"])
    return EXIT_OK


def cmd_job(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    detail = views.job_detail(args.job_id, store.get_job(_db(), args.job_id))
    output.result(detail, views.job_lines(detail))
    return EXIT_OK


def cmd_follow(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    db = _db()
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    live = not output.as_json and output.out.isatty()
    last: dict[str, Any] | None = None
    while True:
        job = store.get_job(db, args.job_id)
        state = views.follow_state(job)
        if state != last:
            if output.as_json:
                output.result({"id": args.job_id, "at": _now(), **state})
            elif live:
                output.out.write("\r\033[K" + views.progress_line(job))
                output.out.flush()
            else:
                output.result(None, [views.progress_line(job)])
            last = state
        status = state["status"]
        if status in views.ENDED_STATUSES:
            if live:
                output.out.write("\n")
            if status != JobStatus.COMPLETED:
                output.note(f"job {args.job_id} ended {status}: {job.get(Field.ERROR) or ''}".rstrip(": "))
                return EXIT_NOT_COMPLETED
            return EXIT_OK
        if deadline is not None and time.monotonic() >= deadline:
            if live:
                output.out.write("\n")
            output.note(f"job {args.job_id} is still {status} after {args.timeout:g}s")
            return EXIT_TIMEOUT
        time.sleep(max(0.1, args.interval))


def cmd_redispatch(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    db = _db()
    before = store.request_redispatch(db, args.job_id)
    attempts_before = before.get(Field.ATTEMPT_HISTORY) or []

    def settled(job: dict[str, Any]) -> bool:
        status = job.get(Field.STATUS)
        if status != JobStatus.QUEUED:
            return True  # dispatched already, or put back by the function
        # The function's write: a fresh release and its admin-redispatch marker.
        return len(job.get(Field.ATTEMPT_HISTORY) or []) > len(attempts_before) and \
            job.get(Field.NEXT_ATTEMPT_AT) is not None

    return _report_request(db, args, output, "re-dispatch", settled,
                           accepted=lambda job: job.get(Field.STATUS) != JobStatus.FAILED,
                           refusal="the on_job_updated function put the job back to failed "
                           "(its log says why, e.g. another job of the actor started meanwhile)")


def cmd_cancel(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    db = _db()
    store.request_cancel(db, args.job_id)
    return _report_request(
        db, args, output, "cancel",
        settled=lambda job: (job.get(Field.STATUS) or JobStatus.PENDING) in views.ENDED_STATUSES,
        accepted=lambda job: job.get(Field.STATUS) == JobStatus.CANCELLED,
        refusal="the job ended otherwise before the cancellation took effect",
    )


def _report_request(db: Any, args: argparse.Namespace, output: Output, what: str,
                    settled: Any, accepted: Any, refusal: str) -> int:
    from actorgen.cli import store

    if args.wait <= 0:
        output.result({"id": args.job_id, "requested": what, "confirmed": False},
                      [f"{what} of job {args.job_id} requested"])
        return EXIT_OK
    job = store.wait_for(db, args.job_id, settled, args.wait)
    if job is None:
        output.result({"id": args.job_id, "requested": what, "confirmed": False},
                      [f"{what} of job {args.job_id} requested"])
        output.note(f"the on_job_updated function has not acted within {args.wait:g}s: is it "
                    "deployed (or the Functions emulator running)? The request stays on the job.")
        return EXIT_TIMEOUT
    status = job.get(Field.STATUS) or JobStatus.PENDING
    ok = bool(accepted(job))
    output.result(
        {"id": args.job_id, "requested": what, "confirmed": ok, "status": status,
         "error": job.get(Field.ERROR)},
        [f"{what} of job {args.job_id} {'done' if ok else 'refused'}: now {status}"],
    )
    if not ok:
        output.note(f"actorgen {args.command}: {refusal}")
    return EXIT_OK if ok else EXIT_REFUSED


def cmd_models(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    actor = store.get_actor(_db(), args.actor_id)
    versions = views.model_versions(actor)
    if versions and not args.no_files:
        from actorgen import clients

        bucket = clients.storage_bucket(getattr(args, "bucket", None) or None)
        uid = str(actor.get(Field.USER_ID) or "")
        for v in versions:
            job_id = str(v.get(schema.ModelVersionField.JOB_ID) or "")
            v["files"] = store.model_files(bucket, uid, args.actor_id, job_id) if job_id else []
    output.result(
        {"actorId": args.actor_id, "modelStatus": actor.get(Field.MODEL_STATUS),
         "modelId": actor.get(Field.MODEL_ID), "versions": versions},
        views.models_lines(args.actor_id, actor, versions),
    )
    return EXIT_OK


def cmd_stats(args: argparse.Namespace, output: Output) -> int:
    from actorgen.cli import store

    db = _db()
    now = _now()
    since = now - views.parse_age(args.since)
    result = views.stats(store.jobs_created_since(db, since), store.queued_jobs(db), now, since)
    output.result(result, views.stats_lines(result))
    return EXIT_OK


COMMANDS = {
    "jobs": cmd_jobs,
    "job": cmd_job,
    "follow": cmd_follow,
    "redispatch": cmd_redispatch,
    "cancel": cmd_cancel,
    "models": cmd_models,
    "stats": cmd_stats,
}

if __name__ == "__main__":
    raise SystemExit(main())

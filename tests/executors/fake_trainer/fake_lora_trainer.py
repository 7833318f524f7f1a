"""Stand-in for ``lora_trainer`` in LocalExecutor tests; FAKE_TRAINER_MODE picks what it does.

It prints one JSON line describing how it was started (arguments, environment,
working directory, where ``actorgen`` was imported from), then:
exit0 / exit1 (with an error on stderr) / wait (until a ``release`` file appears in
its working directory) / ignore-term (waits like ``wait`` but ignores SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import actorgen.schema  # the trainer imports the shared schema from functions/

parser = argparse.ArgumentParser()
parser.add_argument("--job-id", required=True)
parser.add_argument("--attempt", type=int, required=True)
args = parser.parse_args()
mode = os.environ.get("FAKE_TRAINER_MODE", "exit0")
print(
    json.dumps(
        {
            "argv": sys.argv[1:],
            "job_id": args.job_id,
            "attempt": args.attempt,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "schema_file": actorgen.schema.__file__,
        }
    ),
    flush=True,
)
if mode == "exit0":
    sys.exit(0)
if mode == "exit1":
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(1)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while not os.path.exists("release"):
    time.sleep(0.02)
print("released", flush=True)

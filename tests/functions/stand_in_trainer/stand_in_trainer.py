"""A stand-in for ``python -m lora_trainer`` in the dispatcher and reconciler tests.

ACTORGEN_STAND_IN_MODE picks what it does: ``hang`` (run until stopped; the
default), ``exit0`` (end at once without writing anything: the executor then says
succeeded), ``exit1`` (fail with an error message on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--job-id", required=True)
parser.add_argument("--attempt", type=int, required=True)
args = parser.parse_args()
mode = os.environ.get("ACTORGEN_STAND_IN_MODE", "hang")
print(f"stand-in trainer: job {args.job_id} attempt {args.attempt} mode {mode}", flush=True)
if mode == "exit0":
    sys.exit(0)
if mode == "exit1":
    print("RuntimeError: CUDA out of memory", file=sys.stderr, flush=True)
    sys.exit(1)
deadline = time.monotonic() + 600  # never outlive a test run by much
while time.monotonic() < deadline:
    time.sleep(0.2)

#!/usr/bin/env python3
"""Stand-in for the Cloud Storage rules runtime jar, for machines that cannot download it.

The Storage emulator (Node, inside firebase-tools) refuses to start without its
rules-runtime jar, which only Google's servers serve. This script speaks the
runtime's protocol (JSON lines on stdin/stdout) and PERMITS EVERY REQUEST: it
does NOT evaluate storage.rules. tools/emulators.py uses it only when the real
jar is missing from the firebase-tools cache, and says so loudly.

It is started as ``java ... -jar <this file> serve`` by firebase-tools; the
``java`` shim written by tools/emulators.py turns that into ``python3 <this file>``.
"""

from __future__ import annotations

import json
import signal
import sys


def _answer(request: dict) -> dict:
    """The runtime's reply to one request: rulesets always load, every check is permitted."""
    if request.get("action") == "load_ruleset":
        result: dict = {"rulesVersion": 2}
    else:
        result = {"permit": True}
    return {"id": request["id"], "status": "ok", "errors": [], "warnings": [], "result": result}


def main() -> int:
    """Serve requests until stdin closes or the emulator sends SIGINT."""
    # firebase-tools stops the runtime with SIGINT: exit quietly, without a traceback.
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"id": -1, "status": "ok"}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError:
            print(f"storage rules stand-in: ignoring non-JSON line {line[:80]!r}", file=sys.stderr)
            continue
        if isinstance(request, dict) and "id" in request and "action" in request:
            print(json.dumps(_answer(request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

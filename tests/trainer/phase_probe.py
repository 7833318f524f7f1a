"""The real trainer entry point with one phase held open, for the SIGTERM tests.

``python -m tests.trainer.phase_probe MODULE:FUNCTION SECONDS <trainer arguments>``
runs ``lora_trainer``'s ``main`` exactly as the container does, except that on
entering FUNCTION it prints :data:`MARKER` to stderr and lingers SECONDS before
doing the real work. The linger stands in for what makes the phase long at full
scale (a base-model download, hundreds of class images, sample rendering), so a
signal can be sent while the process is known to be in that phase.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

MARKER = "PHASE-PROBE: entered"


def hold(target: str, seconds: float) -> None:
    """Wrap ``module:function`` so that it announces itself and lingers first."""
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        print(f"{MARKER} {target}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    setattr(module, name, held)


if __name__ == "__main__":
    from lora_trainer.__main__ import main

    target, seconds, *trainer_args = sys.argv[1:]
    hold(target, float(seconds))
    sys.exit(main(trainer_args))

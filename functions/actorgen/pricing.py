"""What one training worker costs per hour, from the deployment's price table (pure).

The table is the ``GPU_PRICES`` param: comma-separated ``KEY=USD_PER_HOUR`` entries
whose keys are Vertex machine types (the machine without its GPUs) and
accelerator types (one GPU). A worker costs its machine plus ``count`` times its
accelerator. An entry may be prefixed with a scheduling strategy
(``SPOT:NVIDIA_L4=0.22``); such entries win for jobs scheduled that way, so spot
discounts can be written down where they are known.

The dispatcher passes the result to the trainer as ``schema.ENV_GPU_PRICE_PER_HOUR``;
the trainer multiplies it by the seconds its worker ran (``gpuSeconds``) into
``estimatedCostUsd``. It is an estimate of list prices: Cloud Billing is the truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

#: Approximate on-demand list prices (USD per hour, us-central1) of Vertex AI custom
#: training, after https://cloud.google.com/vertex-ai/pricing ("Custom-trained models",
#: machine types and accelerators billed separately). Written down on 2026-12-03 from
#: the author's knowledge of that page; NOT re-checked against the live page (the
#: build machine had no internet). Prices differ by region and change: check the page
#: and set GPU_PRICES for your deployment.
DEFAULT_GPU_PRICES: Final = ",".join(
    (
        "g2-standard-4=0.27",
        "g2-standard-8=0.35",
        "g2-standard-12=0.43",
        "g2-standard-16=0.58",
        "n1-standard-4=0.22",
        "n1-standard-8=0.44",
        "a2-highgpu-1g=0.87",
        "a2-ultragpu-1g=1.30",
        "a3-highgpu-1g=2.60",
        "NVIDIA_L4=0.64",
        "NVIDIA_TESLA_T4=0.40",
        "NVIDIA_TESLA_V100=2.93",
        "NVIDIA_TESLA_A100=3.37",
        "NVIDIA_A100_80GB=4.52",
        "NVIDIA_H100_80GB=11.06",
    )
)


class PriceTableError(ValueError):
    """The price table cannot be read; the message names the entry to fix."""


def parse_price_table(text: str) -> dict[str, float]:
    """``"KEY=USD,KEY=USD"`` as a dict; raises :class:`PriceTableError` on a bad entry."""
    table: dict[str, float] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PriceTableError(
                f"GPU_PRICES entry {entry[:40]!r} must look like NVIDIA_L4=0.64 (KEY=USD per hour)"
            )
        try:
            price = float(value)
        except ValueError:
            price = math.nan
        if not math.isfinite(price) or price < 0:
            raise PriceTableError(
                f"GPU_PRICES entry {entry[:40]!r}: the price must be a number >= 0 (USD per hour)"
            )
        table[key] = price
    return table


def worker_price_per_hour(
    table: Mapping[str, float],
    machine_type: str,
    accelerator_type: str,
    accelerator_count: int,
    scheduling_strategy: str = "",
) -> float | None:
    """USD per hour of one worker (machine + its GPUs); None when the table lacks a part.

    A partial figure would understate the cost, so a missing machine or accelerator
    price gives no estimate at all.
    """

    def price(key: str) -> float | None:
        if scheduling_strategy and f"{scheduling_strategy}:{key}" in table:
            return table[f"{scheduling_strategy}:{key}"]
        return table.get(key)

    machine = price(machine_type) if machine_type else 0.0
    if machine is None:
        return None
    total = machine
    if accelerator_type and accelerator_count > 0:
        gpu = price(accelerator_type)
        if gpu is None:
            return None
        total += gpu * accelerator_count
    return round(total, 6)


def format_price(usd_per_hour: float) -> str:
    """The env value: a plain decimal the trainer parses with ``float``."""
    return f"{usd_per_hour:.6g}"

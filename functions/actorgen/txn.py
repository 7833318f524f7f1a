"""Firestore transactions that survive contention (many photos of one actor at once)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

T = TypeVar("T")
ATTEMPTS: Final = 12
#: Longest pause between two tries; the pauses are random so contenders spread out.
MAX_PAUSE_SECONDS: Final = 2.0


def run_in_transaction(
    db: FirestoreClient, body: Callable[[Any], T], *, attempts: int = ATTEMPTS
) -> T:
    """Run ``body(transaction)`` in a transaction; on contention, run it again on fresh data.

    The client library retries an aborted commit at once and with the same
    contenders, and does not retry a read that aborts. When several functions
    update one document together (an actor's photos arrive at once) the
    Firestore emulator times their locks out again and again that way, so each
    try here is a single transaction and the retries wait a random, growing
    pause. Errors other than contention (``InvalidTransition``...) are raised.
    """
    from google.api_core import exceptions
    from google.cloud import firestore

    transactional = firestore.transactional(body)
    for attempt in range(attempts):
        try:
            return transactional(db.transaction(max_attempts=1))
        except (exceptions.Aborted, ValueError) as exc:
            # The library wraps an aborted commit as ValueError("Failed to commit...").
            contention = isinstance(exc, exceptions.Aborted) or isinstance(
                exc.__cause__, exceptions.Aborted
            )
            if not contention or attempt == attempts - 1:
                raise
        time.sleep(random.uniform(0, min(MAX_PAUSE_SECONDS, 0.05 * 2**attempt)))
    raise AssertionError("unreachable")

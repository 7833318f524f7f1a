"""Executors: where a training attempt runs (Vertex AI CustomJob or a local process).

Importing this package is cheap: ``google.cloud.aiplatform`` is imported only when
a :class:`VertexExecutor` makes its first API call.
"""

from __future__ import annotations

from .base import (
    Executor,
    ExecutorError,
    ExecutorJob,
    ExecutorNotFound,
    ExecutorState,
    SubmitRequest,
)
from .settings import KIND_LOCAL, KIND_VERTEX, KINDS, ExecutorSettings

__all__ = [
    "KINDS",
    "KIND_LOCAL",
    "KIND_VERTEX",
    "Executor",
    "ExecutorError",
    "ExecutorJob",
    "ExecutorNotFound",
    "ExecutorSettings",
    "ExecutorState",
    "SubmitRequest",
    "build_executor",
]


def build_executor(settings: ExecutorSettings) -> Executor:
    """The executor for ``settings.kind``.

    Construction does no I/O and does not validate Vertex settings (deploy-time
    analysis may not have params yet); ``submit`` raises a non-retryable
    :class:`ExecutorError` naming any missing setting.
    """
    if settings.kind == KIND_VERTEX:
        from .vertex import VertexExecutor

        return VertexExecutor(settings)
    if settings.kind == KIND_LOCAL:
        from .local import LocalExecutor

        return LocalExecutor(settings)
    raise ExecutorError(
        f"unknown executor kind {settings.kind!r}; use one of {', '.join(KINDS)}",
        retryable=False,
    )

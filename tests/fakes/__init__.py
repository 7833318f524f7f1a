"""Fakes of external services that speak their real wire protocols (no in-memory mocks)."""

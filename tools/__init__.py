"""Developer tooling: the emulator harness (not deployed)."""

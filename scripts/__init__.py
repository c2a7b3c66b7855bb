"""Tooling run from the checkout, not shipped in the wheel: benchmarks, the queue runner, studies."""

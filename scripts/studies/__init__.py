"""The study tooling behind docs/results: run records, uncertainty, and each results page."""

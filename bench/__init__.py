"""Benchmarks that print tables: `python -m bench.phases` (one forward, phase by phase) and
`python -m bench.conversation` (whole conversations through the app's turn code)."""

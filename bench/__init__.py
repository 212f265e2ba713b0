"""Benchmarks, run with `osmf bench NAME [--quick]`; each ends with one JSON line."""

"""Benchmarks that print JSON: `python -m benchmarks.decode`, `.hops`, `.http`; `make bench` runs all three."""

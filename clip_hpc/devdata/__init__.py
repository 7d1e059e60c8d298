"""Generators of sample data and the demo model: used by the demo, the tests and the benchmarks."""

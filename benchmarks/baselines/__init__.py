"""Baseline servers the benchmark compares mmfusion with (each runs as its own process)."""

"""Benchmarks of mmfusion against the baselines users would pick instead (``python -m benchmarks.run``)."""

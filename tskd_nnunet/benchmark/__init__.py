"""Benchmark: report and figures (the resumable runner lives beside them)."""

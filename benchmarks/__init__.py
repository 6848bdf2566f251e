"""Benchmarks: the figures of DESIGN.md section 9 as ratios measured in one run (`python -m benchmarks.run`)."""

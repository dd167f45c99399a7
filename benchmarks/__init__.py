"""Speed benchmarks for featurecache: `python -m benchmarks [--quick]`.

One module per measurement, each with `run(config) -> list[Row]`; `__main__` runs
them in one process and prints one table of ratios. Timings interleave baseline and
candidate (A B A B ...) after a warm-up and report medians, because the CPU may be
shared with other work.
"""

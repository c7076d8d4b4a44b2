"""`dockercoins bench`: the in-process ceiling, the turbo pipeline grid, the cost of stage timing,
plumbing latency, a soak.

Everything runs in one process tree and one run, so that the ratios compare like with like
on a shared, noisy machine: absolute numbers are quoted, never asserted.
"""

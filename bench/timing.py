"""Timing shared by both sides of the benchmarks (plain numpy: the torch venv has no jax)."""
from __future__ import annotations

import time

import numpy as np


def best_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of fn() (which must block), after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))

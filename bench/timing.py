"""Timing shared by both sides of the benchmarks (plain numpy: the torch venv has no jax)."""
from __future__ import annotations

import os
import resource
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


def minor_faults(fn) -> int:
    """Page faults one call of fn() takes: the fresh pages its buffers touch (see btx_jax/host_memory.py)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def host_memory_line() -> str:
    """How this process's malloc gets its pages: the setting both sides of a bench run with."""
    from btx_jax import host_memory  # the jax side only (the torch venv has no btx_jax); imports nothing heavy

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if host_memory.TUNABLE in tunables:
        kept = ", freed memory kept" if all(t.split("=")[0] in tunables for t in host_memory.KEEP_FREED) else ""
        return f"host memory: transparent huge pages{kept} (GLIBC_TUNABLES={tunables}; BTX_JAX_HUGE_PAGES=0 runs without)"
    return "host memory: 4 KiB pages (no glibc.malloc.hugetlb tunable: BTX_JAX_HUGE_PAGES=0, or huge pages off here)"

"""JAX's persistent compilation cache, on by default for every entry point.

A recipe trains many stages of the same shapes (the seed, each branch, the baselines), and every
process would otherwise compile the same train step again; the cache keeps each compiled
program on disk, keyed by the program, the jax version and the backend. Directory:
``$BTX_JAX_COMPILATION_CACHE`` if set (``off`` disables it), else ``$XDG_CACHE_HOME/btx_jax/jax``
(``~/.cache/btx_jax/jax``). Programs that compile in under 0.2 s are not worth a file.

Not in a multi-process job on CPU (:func:`off_for_cpu_jobs`): there, a train step that crosses
processes and was loaded from the cache hung in its first collective (two processes resuming a
run whose first launch had filled the cache, tests/test_multiprocess.py), whether both processes
loaded it or process 0 alone (JAX writes process 0's programs only); compiled afresh, it runs.
TPU and GPU jobs keep the cache.
"""
from __future__ import annotations

import os

import jax

ENV = "BTX_JAX_COMPILATION_CACHE"


def cache_dir() -> str | None:
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return os.path.expanduser(value)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "btx_jax", "jax")


def enable(directory: str | None = None) -> str | None:
    """Turns the cache on (idempotent); returns its directory, or None when disabled."""
    directory = directory or cache_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def off_for_cpu_jobs(tag: str) -> None:
    """Turns the cache off in a multi-process job on the CPU backend (see the module docstring); call it
    after joining the job and before the first compile (JAX decides at the first compile)."""
    cache_on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    if cache_on and jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        print(f"{tag} compilation cache off: a multi-process job on CPU compiles its programs afresh", flush=True)

"""Transparent huge pages for the host's big short-lived buffers: a restart with a glibc tunable.

XLA:CPU allocates all temporaries of one execution as a single buffer and frees it afterwards
(852 MB for DENSE_BENCH's train step). glibc serves a block that big with a fresh ``mmap`` and
unmaps it on free, so every step faults ~210,000 new 4 KiB pages in again; the surgeon's streamed
chunks do the same (3.3 million faults on SURGEON_BENCH). With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
malloc asks for transparent huge pages on those maps: ~1,100 faults per DENSE_BENCH step, and the
step ~13% faster on a 2-core CPU, the demo seed's ~25% (README, "Host memory" and "Benchmark";
``bench/train_step.py`` prints the faults per step). glibc reads a tunable only at start-up, so each command line restarts itself once with
it set, before jax is imported: ``if __name__ == "__main__": host_memory.reexec_with_huge_pages()``.

The training commands (``train``, ``recipe``, the benchmarks) also keep freed memory
(``keep_freed=True``: two malloc arenas, no ``mmap`` for big blocks, no trimming), so a step's
temporaries reuse the last step's pages and fault nothing in at all: DENSE_EQUIV's step 2.2-2.5 s
-> 1.6 s on a 2-core Xeon, where huge pages alone left ~1,800 faults per step and no gain (README,
"Host memory"). The process then holds its high-water mark; the surgeon (``mix``), whose memory
budget is about its peak, returns freed memory as before.

Skipped where the kernel's huge pages are off (or already "always"), where the tunable is set
already, and with ``BTX_JAX_HUGE_PAGES=0``; a glibc older than 2.35 ignores it. Imports nothing
heavy: it runs before everything else.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# Freed memory stays in the process: few arenas (so a big block freed by one thread serves the next
# step's), big blocks from the heap instead of their own maps, and a heap that is never trimmed.
KEEP_FREED = ("glibc.malloc.arena_max=2", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736")
OPT_OUT = "BTX_JAX_HUGE_PAGES"  # "0": run as started
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never": [] marks the mode


def environ_with_huge_pages(environ, thp_mode: str | None, keep_freed: bool = False) -> dict | None:
    """`environ` with the tunable (and KEEP_FREED's, less those set already) added to GLIBC_TUNABLES, or
    None where a restart would change nothing.

    `thp_mode` is the text of THP_MODE (None where it cannot be read: not Linux, or no such file)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (thp_mode is None or "[madvise]" not in thp_mode or "glibc.malloc.hugetlb" in tunables
            or environ.get(OPT_OUT) == "0"):
        return None
    added = [TUNABLE] + [t for t in (KEEP_FREED if keep_freed else ()) if t.split("=")[0] + "=" not in tunables]
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, *added]))}


def _thp_mode() -> str | None:
    if sys.platform != "linux":
        return None
    try:
        with open(THP_MODE, encoding="ascii") as f:  # the local kernel's setting: not an epath
            return f.read()
    except OSError:
        return None


def reexec_with_huge_pages(keep_freed: bool = False) -> None:
    """Restarts this process (same interpreter, same command line) once with the tunable set (and, with
    `keep_freed`, KEEP_FREED's); else returns."""
    environ = environ_with_huge_pages(os.environ, _thp_mode(), keep_freed)
    if environ is not None and sys.executable:  # an embedded interpreter has no executable to restart
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)

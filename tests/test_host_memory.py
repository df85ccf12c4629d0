"""The command lines' restart with glibc's huge-page tunable (btx_jax/host_memory.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from btx_jax import host_memory

MADVISE = "always [madvise] never\n"


def test_the_tunable_joins_the_ones_already_set():
    env = host_memory.environ_with_huge_pages({"PATH": "/bin"}, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_keep_freed_adds_the_tunables_not_set_already():
    env = host_memory.environ_with_huge_pages({}, MADVISE, keep_freed=True)
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:"
                                     "glibc.malloc.trim_threshold=68719476736")
    env = host_memory.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, MADVISE, keep_freed=True)
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=8:glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                                     "glibc.malloc.trim_threshold=68719476736")


def test_kept_memory_is_not_faulted_in_again():
    """What KEEP_FREED is for: a big block freed and allocated again (as XLA:CPU does with each step's
    temporaries) reuses its pages instead of mapping fresh ones (~25,600 faults per 100 MB otherwise)."""
    script = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(100_000_000)
            ctypes.memset(block, 1, 100_000_000)  # every page touched
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(sum(faults[1:]) / 4)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BTX_JAX_HUGE_PAGES")}

    def faults(tunables):
        run = subprocess.run([sys.executable, "-c", script], env={**env, "GLIBC_TUNABLES": tunables},
                             capture_output=True, text=True, check=True)
        return float(run.stdout.split()[-1])

    fresh, kept = faults(""), faults(":".join(host_memory.KEEP_FREED))
    assert fresh > 20_000 and kept < 1_000, (fresh, kept)


def test_no_restart_where_it_would_change_nothing():
    assert host_memory.environ_with_huge_pages({}, None) is None  # not Linux, or no THP file
    assert host_memory.environ_with_huge_pages({}, "always madvise [never]\n") is None  # huge pages off
    assert host_memory.environ_with_huge_pages({}, "[always] madvise never\n") is None  # every map gets them
    assert host_memory.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE) is None
    assert host_memory.environ_with_huge_pages({"BTX_JAX_HUGE_PAGES": "0"}, MADVISE) is None


def test_a_command_restarts_once_with_its_arguments(tmp_path):
    """The restart keeps the interpreter's flags and the arguments, runs the module's top again, and stops there."""
    script = tmp_path / "cmd.py"
    starts = tmp_path / "starts"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        with open({str(starts)!r}, "a") as f:
            f.write("start\\n")
        if __name__ == "__main__":
            from btx_jax import host_memory
            host_memory.reexec_with_huge_pages()
        print(repr(sys.argv[1:]), sys.flags.optimize, os.environ.get("GLIBC_TUNABLES"))
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BTX_JAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-O", str(script), "a b", "--flag=1"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    restarted = host_memory.environ_with_huge_pages(env, host_memory._thp_mode()) is not None
    assert " ".join(out[:-2]) == "['a b', '--flag=1']" and out[-2] == "1"  # arguments and -O survive
    assert out[-1] == ("glibc.malloc.hugetlb=1" if restarted else "None")
    assert starts.read_text().count("start") == (2 if restarted else 1)

    starts.write_text("")
    out = subprocess.run([sys.executable, str(script)], env={**env, "BTX_JAX_HUGE_PAGES": "0"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "None" and starts.read_text().count("start") == 1


@pytest.mark.parametrize("module", ["btx_jax.train", "btx_jax.recipe", "btx_jax.mix"])
def test_each_command_line_restarts_before_importing_jax(module):
    """`-X importtime` lists every import of both processes: the guard runs in each, jax in the last only."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BTX_JAX_HUGE_PAGES")}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], env=env,
                            capture_output=True, text=True)
    assert "usage" in result.stdout.lower() or module in result.stdout, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    restarted = host_memory.environ_with_huge_pages(env, host_memory._thp_mode()) is not None
    assert imported.count("btx_jax.host_memory") == (2 if restarted else 1)
    assert imported.count("jax") == 1

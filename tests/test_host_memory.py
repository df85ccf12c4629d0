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

"""Test set-up: 8 fake CPU devices (set before jax is imported) so sharding is tested for real."""
import fcntl
import os

# LLVM optimization level 0: the tests' programs are tiny, so compiling them costs more than running
# them (test_moe.py: 83 s -> 51 s from an empty compilation cache). The level is LLVM's, for the
# machine code; XLA's buffer assignment came out the same (test_scale.py's compiled temporaries).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; XLA_FLAGS was set too late"

import pytest  # noqa: E402

from btx_jax import compilation_cache  # noqa: E402

# One compilation cache for the whole run, shared by both xdist workers and the processes tests start:
# many tests compile the same tiny models.
os.environ.setdefault(compilation_cache.ENV, os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
compilation_cache.enable()


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """The full demo corpus (code, math, prose and the recipe's out-of-domain docs), built once per test run
    (~8 s) and shared by the xdist workers: the first to take the lock builds it while the other waits.
    Every domain a test reads is built here, so no test writes into it."""
    from btx_jax.data.build import build_all
    from btx_jax.config import load_config

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above the workers' own
    data = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "btx_demo.py")).data
    data.data_dir = str(root / "demo_corpus")
    with open(root / "demo_corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "demo_corpus.done").exists():
            build_all(data)
            (root / "demo_corpus.done").touch()
    return data.data_dir


@pytest.fixture(scope="session")
def tiny_recipe_run(demo_data_dir, tmp_path_factory):
    """(config, workdir, results, printed lines) of one finished tiny recipe run: every stage, baselines,
    variants, the report with its opt-out table. Built once per worker; the tests that read it are in
    the xdist group "recipe", so one worker builds it."""
    from btx_jax import recipe
    from helpers import tiny_recipe_config

    config = tiny_recipe_config(demo_data_dir)
    workdir = tmp_path_factory.mktemp("btx")
    lines = []
    results = recipe.run(config, str(workdir), out=lines.append)
    return config, workdir, results, lines

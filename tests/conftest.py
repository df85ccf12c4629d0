"""Test set-up: 8 fake CPU devices (set before jax is imported) so sharding is tested for real."""
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
    """The full demo corpus (code, math, prose) built once per test worker (~10 s)."""
    from btx_jax.data.build import build_all
    from btx_jax.config import base_config

    data = base_config().data
    data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    build_all(data)
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

"""Test set-up: 8 fake CPU devices (set before jax is imported) so sharding is tested for real."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; XLA_FLAGS was set too late"

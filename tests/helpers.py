"""Shared test utilities: tiny configs, random batches, meshes over subsets of the fake devices."""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from ml_collections import ConfigDict

from btx_jax.config import base_config, load_config
from btx_jax import sharding


def tiny_config(**model_overrides) -> ConfigDict:
    c = base_config()
    c.model.update(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
    c.model.update(**model_overrides)
    c.data.update(seq_len=32, batch_size=8)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=10, peak_flops=1e11)
    c.moe.grouped_block = 32  # for the MoE tests: tens of rows per expert, and fewer remainder branches to compile
    return c


def tiny_recipe_config(data_dir):
    """The BTX demo recipe at its `:tiny` size (every stage in about a minute) on the tests' corpus."""
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/btx_demo.py:tiny"))
    config.data.data_dir = data_dir
    config.train.peak_flops = 1e11
    return config


def subprocess_env(devices: int = 8) -> dict:
    """The environment for a `python -m btx_jax...` child process: this run's XLA flags (conftest.py)
    with `devices` fake CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", f"--xla_force_host_platform_device_count={devices}",
                   os.environ["XLA_FLAGS"])
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def mesh_of(devices=None, **axes) -> jax.sharding.Mesh:
    spec = ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    spec.update(**axes)
    devices = jax.devices() if devices is None else devices
    if "data" not in axes:
        spec.data = -1
    return sharding.make_mesh(spec, devices)


def random_batch(config, seed: int = 0, docs_per_row: int = 2) -> dict:
    """A packed batch: each row holds `docs_per_row` documents then padding."""
    rng = np.random.default_rng(seed)
    b, t = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(3, 259, size=(b, t + 1)).astype(np.int32)
    seg = np.zeros((b, t + 1), np.int32)
    pos = np.zeros((b, t + 1), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(2, t - 1), size=docs_per_row, replace=False))
        start = 0
        for d, end in enumerate(cuts, 1):
            seg[row, start:end] = d
            pos[row, start:end] = np.arange(end - start)
            start = end
    from btx_jax.data.pipeline import to_model_batch
    return to_model_batch({"tokens": tokens, "tokens_segment_ids": seg, "tokens_positions": pos,
                           "domain": np.zeros((b, t + 1), np.int32)})

"""Bench helpers: configs from BENCH.md, timing, and a one-device train step."""
from __future__ import annotations

import jax
import numpy as np

from btx_jax import steps
from btx_jax.config import base_config
from btx_jax.sharding import make_mesh
from btx_jax.state import init_params, make_setup


def dense_bench_config(mlp_dim: int = 1536):
    """DENSE_BENCH (mlp_dim 1536) or DENSE_EQUIV (mlp_dim 3072): vocab 8192, d 512, 4 layers, 8 x 64 heads."""
    c = base_config()
    c.model.update(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64,
                   mlp_dim=mlp_dim, dtype="float32", param_dtype="float32", remat="none")
    c.data.update(seq_len=512, batch_size=4)
    c.optim.update(warmup_steps=10)
    c.train.update(steps=1000)
    return c


def train_step_runner(config):
    """A zero-argument callable running one blocking train step on the first device."""
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    setup = make_setup(config, mesh)
    state = setup.init_state(init_params(config, setup, seed=0))
    rng = np.random.default_rng(0)
    b, t = config.data.batch_size, config.data.seq_len
    batch = {"inputs": rng.integers(3, config.model.vocab_size, (b, t)).astype(np.int32),
             "targets": rng.integers(3, config.model.vocab_size, (b, t)).astype(np.int32),
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "loss_mask": np.ones((b, t), np.float32), "domain": np.zeros((b,), np.int32)}
    shardings = steps.batch_shardings(mesh)
    batch = steps.to_global(batch, shardings)
    train_step = steps.make_train_step(setup, shardings, config)
    holder = {"state": state}

    def run():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run

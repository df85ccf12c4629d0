"""Model FLOPs per token (for MFU and compute accounting) and the hardware peak to divide by."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from btx_jax.hardware import PEAK_FLOPS_BY_KIND as _PEAK_BY_DEVICE_KIND  # dense bf16 FLOP/s per chip


def matmul_params(m, moe=None) -> int:
    """N: *active* weights per token in matmuls (attention, FFN, lm_head), without embeddings and norms.

    An MoE layer counts top_k expert FFNs plus its router; `moe` is the config's moe section.
    """
    attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    ffn = 3 * m.d_model * m.mlp_dim
    dense = m.num_layers * (attn + ffn) + m.d_model * m.vocab_size
    if moe is None or not moe.num_experts:
        return dense
    moe_layers = m.num_layers // moe.moe_every
    return dense + moe_layers * ((moe.top_k - 1) * ffn + m.d_model * moe.num_experts)


def train_flops_per_token(m, seq_len: int, moe=None) -> float:
    """6 N (forward + backward of the active matmuls) + 6 L (H Dh) seq (causal attention scores and mixing)."""
    return 6.0 * matmul_params(m, moe) + 6.0 * m.num_layers * m.num_heads * m.head_dim * seq_len


@functools.cache
def measure_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-`repeats` f32 n x n matmul FLOP/s on the first device, after a warm-up; measured once per
    process (~1 s on 2 CPU cores), not once per training run (a recipe trains a dozen stages)."""
    device = jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def job_peak_flops(configured: float = 0.0) -> float:
    """FLOP/s of the whole job: configured, else the vendor figure x devices, else measured.

    On CPU the fake devices share the host's cores, so the measured host matmul rate is the
    job's peak however many devices the mesh has.
    """
    if configured > 0:
        return configured
    devices = jax.devices()
    per_device = _PEAK_BY_DEVICE_KIND.get(devices[0].device_kind)
    if per_device is not None:
        return per_device * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops()
    return measure_matmul_flops() * len(devices)

"""The hardware a run can target: chips, hosts, memory and peak FLOP/s per device, in one table.

``recipe.target`` names a row of :data:`TARGETS`; ``recipe --plan`` and the memory check
(:mod:`btx_jax.memory`) read it, and :mod:`btx_jax.flops` takes its per-chip peaks from
:data:`PEAK_FLOPS_BY_KIND`, so a chip's figure is written once.
"""
from __future__ import annotations

import dataclasses

from btx_jax.config import ConfigError

# Dense bf16 matmul peak per chip, FLOP/s (vendor figures), keyed by jax's `device.device_kind`.
# A v5p reports "TPU v5" (XLA's own table lists both spellings); a v5e reports "TPU v5 lite".
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
}

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """One slice or machine: `devices` chips over `hosts` hosts, `hbm_bytes` and `peak_flops` per chip."""

    name: str
    devices: int
    hosts: int
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip
    kind: str          # jax's device_kind on this hardware

    @property
    def job_peak_flops(self) -> float:
        return self.devices * self.peak_flops


def _target(name: str, devices: int, hosts: int, hbm_bytes: float, kind: str) -> Target:
    return Target(name, devices, hosts, int(hbm_bytes), PEAK_FLOPS_BY_KIND[kind], kind)


# HBM as the vendors state it, rounded down where they differ (v5p: 95 GB; XLA assumes 95 GiB).
# GPUs: jax preallocates 75% of HBM unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
TARGETS = {t.name: t for t in (
    _target("v5p-128", 64, 16, 95e9, "TPU v5"),
    _target("v5p-256", 128, 32, 95e9, "TPU v5"),
    _target("v4-128", 64, 16, 32 * GiB, "TPU v4"),
    _target("8xH100", 8, 1, 80e9, "NVIDIA H100 80GB HBM3"),
    _target("8xH200", 8, 1, 141e9, "NVIDIA H200"),
)}


def get(name: str, field: str = "recipe.target") -> Target:
    """The target called `name`; a ConfigError naming the known targets otherwise."""
    if name not in TARGETS:
        raise ConfigError(field, f"unknown target {name!r}",
                          f"use one of {', '.join(TARGETS)} (or add a row to btx_jax/hardware.py TARGETS)")
    return TARGETS[name]

"""Joining a multi-process JAX job, the same way in ``train``, ``mix`` and ``recipe``.

One process per host (TPU VM, GKE) or per GPU / node (SLURM). ``jax.distributed.initialize()``
finds the coordinator by itself on TPU VMs, GKE (the ``xpk`` workloads of ``launch/``) and
SLURM; anywhere else give it explicitly, by flag or environment variable:

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  JAX_COORDINATOR_ADDRESS=HOST:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I

``BTX_DISTRIBUTED=1`` (set by the launch scripts) asks for auto-detection. A single process
with none of these set does not initialize anything.
"""
from __future__ import annotations

import os

import jax
from absl import flags

from btx_jax import compilation_cache

_FLAGS: dict = {}


def define_flags() -> None:
    """The coordinator flags, for the entry points that run as programs."""
    _FLAGS["address"] = flags.DEFINE_string("coordinator_address", None,
                                            "HOST:PORT of process 0 for a multi-process job (else auto-detected).")
    _FLAGS["count"] = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
    _FLAGS["index"] = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def _flag(name: str):
    holder = _FLAGS.get(name)
    return holder.value if holder is not None else None


def requested() -> dict | None:
    """The arguments for jax.distributed.initialize, or None for a single-process run."""
    env = os.environ
    address = _flag("address") or env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count, index = _flag("count"), _flag("index")
        count = int(env["JAX_NUM_PROCESSES"]) if count is None and "JAX_NUM_PROCESSES" in env else count
        index = int(env["JAX_PROCESS_ID"]) if index is None and "JAX_PROCESS_ID" in env else index
        if count is None or index is None:
            raise ValueError(f"coordinator {address} given without the process count and index\n"
                             "  fix: also pass --num_processes=N --process_id=I (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        return {"coordinator_address": address, "num_processes": count, "process_id": index}
    if env.get("BTX_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}  # TPU VM / GKE / SLURM: auto-detected
    return None


def initialize(tag: str = "[jax]") -> None:
    """Joins the job if one is requested (idempotent); prints this process's place in it."""
    args = requested()
    if args is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**args)
    print(f"{tag} process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} devices", flush=True)
    compilation_cache.off_for_cpu_jobs(tag)


def is_main() -> bool:
    """Process 0 writes the files every process would otherwise write alike (metrics, reports, manifests)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of a multi-process job gets here (a no-op for one process): after process 0
    changed shared files that the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""Bytes per device of a training stage on N devices, planned without devices (AbstractMesh).

Why: a 7B run must be known to fit a v4 chip's 32 GiB before a pod is reserved. Everything
here is traced, never compiled or allocated, so it runs on a laptop for any device count.

- params, opt_state: :func:`state.make_setup` on an AbstractMesh of the stage's mesh; each
  leaf's ``sharding.shard_shape``.
- grads: the params' shard shapes (same dtype and sharding), twice with ``train.grad_accum`` > 1
  (the running sum and the microbatch's own gradients live at once).
- activations: the residuals the backward pass keeps (under ``model.remat``) for one
  microbatch: ``jax.make_jaxpr`` of ``jax.vjp(loss)`` with the params as input; its outputs are
  the vjp closure's residuals, minus those that are the inputs themselves (the params). Traced
  on a 1-device mesh at 1 and 2 rows: the growth per row is scaled to the rows one device gets
  per microbatch (batch axes data x fsdp x expert); what does not grow with the batch (weights
  cast to the compute dtype) is taken as sharded like the params.
- transient: the largest working set the residuals do not show, estimated as one layer's
  activations without remat (recomputed in that layer's backward when remat is on) plus one
  layer's weights and their gradients unsharded (FSDP gathers a layer at a time).

Left out: XLA's fusion temporaries and collective buffers, the optimizer update's temporaries
(after the backward, when activations are freed), padding of small dims to hardware tiles, and
fragmentation; with ``tensor`` > 1 activations are over-counted (their hidden dims are split).
``moe.grouped_impl=auto`` is planned as ``native`` (what TPUs and GPUs run).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType
from ml_collections import ConfigDict

from btx_jax import sharding, steps
from btx_jax.state import make_setup

KEYS = ("params", "opt_state", "grads", "activations", "transient", "total")


def stage_mesh(config) -> ConfigDict:
    """The mesh section a stage runs on: ``recipe.moe_mesh`` for an MoE stage when set, else ``mesh``."""
    if config.moe.num_experts and config.recipe.get("moe_mesh"):
        return sharding.parse_mesh_spec(config.recipe.moe_mesh)
    return config.mesh


def abstract_mesh(mesh_config: ConfigDict, num_devices: int) -> AbstractMesh:
    sizes = sharding.mesh_shape(mesh_config, num_devices)
    return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def tree_bytes_per_device(tree) -> int:
    """Bytes of one device's shards of ShapeDtypeStructs that carry a sharding."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def stage_memory(config, num_devices: int) -> dict[str, int]:
    """{params, opt_state, grads, activations, transient, total}: bytes per device of one training step."""
    mesh = abstract_mesh(stage_mesh(config), num_devices)
    sharding.check_divisible(config, mesh)
    state = make_setup(config, mesh).abstract_state()
    params = tree_bytes_per_device(state["params"])
    accum = config.train.grad_accum
    rows = config.data.batch_size // accum // int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    param_share = params / _tree_bytes(state["params"])

    per_row, fixed = residual_bytes(config)
    out = {"params": params, "opt_state": tree_bytes_per_device(state["opt_state"]),
           "grads": params * (2 if accum > 1 else 1),
           "activations": int(per_row * rows + fixed * param_share),
           "transient": _transient(config, state["params"], rows)}
    out["total"] = sum(out.values())
    return out


def _transient(config, params: dict, rows: int) -> int:
    """The average layer's recomputed activations (remat on) + the largest layer's weights and gradients
    unsharded (MoE or dense layer: ``layers`` holds L / moe_every blocks, ``dense_layers`` the rest)."""
    layers, every = config.model.num_layers, config.moe.moe_every if config.moe.num_experts else 1
    recompute = 0.0
    if config.model.remat != "none":
        plain, _ = residual_bytes(_with_remat(config, "none"))
        saved, _ = residual_bytes(config)
        recompute = (plain - saved) / layers * rows
    blocks = {"layers": layers // every, "dense_layers": layers // every * (every - 1)}
    layer = max(_tree_bytes(params[name]) / count for name, count in blocks.items() if name in params)
    return int(recompute + 2 * layer)


def _with_remat(config, remat: str):
    c = ConfigDict(config.to_dict())
    c.model.remat = remat
    return c


def residual_bytes(config) -> tuple[float, float]:
    """(bytes per batch row, bytes independent of the batch) of the residuals the backward keeps."""
    key = json.dumps({k: config[k].to_dict() for k in ("model", "moe", "optim")} | {"seq": config.data.seq_len},
                     sort_keys=True)
    return _residual_bytes(key)


@functools.lru_cache(maxsize=32)
def _residual_bytes(key: str) -> tuple[float, float]:
    fields = json.loads(key)
    if fields["moe"]["grouped_impl"] == "auto":  # plan what accelerators run, not this host's CPU path
        fields["moe"]["grouped_impl"] = "native"
    config = ConfigDict({k: fields[k] for k in ("model", "moe", "optim")})
    config.data = ConfigDict({"seq_len": fields["seq"]})
    one, two = (_traced_residuals(config, rows) for rows in (1, 2))
    return float(two - one), float(2 * one - two)


def _traced_residuals(config, rows: int) -> int:
    """Residual bytes of the loss's vjp for a batch of `rows` rows on one device."""
    mesh = AbstractMesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
    setup = make_setup(_with_train_defaults(config), mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.abstract_params)
    ids = jax.ShapeDtypeStruct((rows, config.data.seq_len), jnp.int32)
    batch = {"inputs": ids, "targets": ids, "segment_ids": ids, "positions": ids,
             "loss_mask": jax.ShapeDtypeStruct(ids.shape, jnp.float32)}
    loss_fn = steps.make_loss_fn(setup.graphdef, config)

    def vjp_closure(params, batch):
        totals = steps.token_totals(batch)
        _, vjp, _ = jax.vjp(lambda p: loss_fn(p, batch, jax.random.key(0), totals), params, has_aux=True)
        return vjp

    with sharding.use_mesh(mesh):
        jaxpr = jax.make_jaxpr(vjp_closure)(params, batch).jaxpr
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    return sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in jaxpr.outvars
               if not isinstance(v, jex.Literal) and v not in inputs)


def _with_train_defaults(config):
    """make_setup also builds the optimizer: it needs optim (kept) and train.steps (any value)."""
    c = ConfigDict(config.to_dict())
    c.train = ConfigDict({"steps": c.optim.warmup_steps + 2})
    return c


def table(rows: dict[str, dict[str, int]], hbm_bytes: dict[str, int] | None = None) -> str:
    """A text table, GB per device: one line per stage (name -> stage_memory's dict)."""
    head = f"{'stage':<28}" + "".join(f"{k:>12}" for k in KEYS) + ("      HBM  use" if hbm_bytes else "")
    lines = [head]
    for name, mem in rows.items():
        line = f"{name:<28}" + "".join(f"{mem[k] / 1e9:>12.2f}" for k in KEYS)
        if hbm_bytes:
            hbm = hbm_bytes[name]
            line += f"  {hbm / 1e9:>7.1f} {mem['total'] / hbm:>4.0%}"
        lines.append(line)
    return "\n".join(lines)

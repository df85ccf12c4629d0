"""Mesh construction and the logical-axis rules: the one place that decides what is sharded how.

Parameters and activations are annotated with *logical* axis names (``embed``, ``mlp``,
``heads``...); :data:`RULES` maps each name to mesh axes. Changing a parallelism strategy
means changing this table, not the model.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded),
``expert`` (expert parallel; the batch is also split over it outside MoE layers),
``tensor`` (Megatron-style tensor parallel over heads / FFN hidden / vocab).
"""
from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from btx_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("expert", "expert"),
    # activations: the model dim of activations is replicated, their hidden dims follow the weights
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # MoE expert buffers [E, G, C, D]: experts over `expert`, routing groups over the other batch axes
    ("act_expert", "expert"),
    ("act_expert_groups", ("data", "fsdp")),
)


def parse_mesh_spec(spec: str, field: str = "recipe.moe_mesh") -> ConfigDict:
    """"expert=4,fsdp=-1" -> a mesh section (axes not named are 1), for one command-line string per mesh."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    named = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = (s.strip() for s in item.partition("="))
        if name not in sizes:
            raise ConfigError(field, f"unknown mesh axis {name!r} in {spec!r}", f"use axes among {', '.join(MESH_AXES)}")
        if name in named:
            raise ConfigError(field, f"axis {name!r} given twice in {spec!r}", "name each axis once")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(field, f"{item!r} is not axis=size", "write e.g. 'expert=4,fsdp=-1'") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ConfigError(field, f"{item!r}: a size must be positive or -1", "use e.g. 4, or -1 for the rest")
        named.add(name)
    if not named:
        raise ConfigError(field, f"no mesh axis in {spec!r}", "write e.g. 'expert=4,fsdp=-1'")
    return ConfigDict(sizes)


def mesh_shape(mesh_config: ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the one -1 entry (if any) so that the axis sizes multiply to `num_devices`."""
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[1]}", "only one mesh axis may be -1", "give explicit sizes to the others")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}", f"size must be positive or -1, got {size}", "use e.g. 1 or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh.{free[0]}", f"the fixed axes use {fixed} devices, which does not divide the "
                              f"{num_devices} available", "make the product of the fixed mesh axes divide the device count")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError("mesh", f"mesh {sizes} uses {fixed} devices but {num_devices} are available",
                          "set one axis to -1 to use the remaining devices, or change the sizes")
    return sizes


def make_mesh(mesh_config: ConfigDict, devices=None) -> Mesh:
    """A mesh with all four axes (size 1 where unused) and Auto axis types for GSPMD."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if num_slices(devices) > 1:
        return Mesh(multislice_grid(sizes, devices), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def num_slices(devices) -> int:
    """TPU slices joined over the data-center network (multislice); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_grid(sizes: dict[str, int], devices) -> np.ndarray:
    """Devices of several slices as a mesh array whose ``data`` axis is split across the slices (only its
    gradient all-reduce crosses the slow network) and whose other axes stay inside a slice."""
    slices = num_slices(devices)
    if sizes["data"] % slices:
        raise ConfigError("mesh.data", f"{sizes['data']} does not split over the job's {slices} slices (the data axis "
                          "is the one that crosses slices)", f"use mesh.data={slices} (or a multiple) and fsdp=-1")
    inside = [sizes["data"] // slices] + [sizes[name] for name in MESH_AXES[1:]]
    across = [slices] + [1] * (len(MESH_AXES) - 1)
    return mesh_utils.create_hybrid_device_mesh(inside, across, devices, allow_split_physical_axes=True)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | AbstractMesh):
    """Mesh and logical-axis rules in scope; an AbstractMesh plans shardings without devices."""
    mesh_context = jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh) else jax.set_mesh(mesh)
    with mesh_context, nnx.logical_axis_rules(RULES):
        yield


def logical_to_spec(names, rules=RULES) -> P:
    """PartitionSpec for a tuple of logical axis names."""
    table = dict(rules)
    missing = [n for n in names if n is not None and n not in table]
    if missing:
        raise KeyError(f"logical axes {missing} have no sharding rule; add them to btx_jax.sharding.RULES")
    return P(*(None if n is None else table[n] for n in names))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is set (single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, T, ...]: rows split over data x fsdp x expert."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(config: ConfigDict, mesh: Mesh) -> None:
    """Dimensions must split evenly over the mesh axes they are sharded on."""
    m, size = config.model, dict(mesh.shape)
    batch_ways = size["data"] * size["fsdp"] * size["expert"]
    ways = math.lcm(batch_ways, jax.process_count())
    if config.data.batch_size % ways:
        raise ConfigError("data.batch_size", f"{config.data.batch_size} rows do not split over data x fsdp x expert "
                          f"= {batch_ways} devices ({jax.process_count()} processes)", f"use a multiple of {ways}")
    accum = config.train.get("grad_accum", 1)
    if (config.data.batch_size // accum) % batch_ways:
        raise ConfigError("train.grad_accum", f"a microbatch of {config.data.batch_size} / {accum} rows does not split "
                          f"over data x fsdp x expert = {batch_ways} devices",
                          f"use a grad_accum that leaves a multiple of {batch_ways} rows per microbatch")
    checks = [("model.num_heads", m.num_heads, "tensor"), ("model.num_kv_heads", m.num_kv_heads, "tensor"),
              ("model.mlp_dim", m.mlp_dim, "tensor"), ("model.vocab_size", m.vocab_size, "tensor"),
              ("model.d_model", m.d_model, "fsdp")]
    if config.moe.num_experts:
        checks.append(("moe.num_experts", config.moe.num_experts, "expert"))
    for field, value, axis in checks:
        if value % size[axis]:
            raise ConfigError(field, f"{value} does not split over the '{axis}' mesh axis of size {size[axis]}",
                              f"use a multiple of {size[axis]} or a smaller mesh.{axis}")


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({np.prod(list(mesh.shape.values()))} devices)"

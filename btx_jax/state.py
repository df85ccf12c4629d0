"""The training state: model graph, sharded parameters, optimizer, and their shardings.

The state is a plain dict ``{"params", "opt_state", "step"}`` of arrays (parameters as
``nnx.to_pure_dict`` nested dicts), so Orbax saves and restores it directly and the
surgeon can address any leaf by its path. With ``moe.balance="bias"`` it also holds
``router_bias`` [L_moe, E] float32, replicated: the routers' selection bias, set by a rule
after each step rather than by the optimizer, so it is outside ``params`` (no gradient, no
Adam state, no weight decay, untouched by the surgeon and ``init_from``, which start it at 0)
and is checkpointed and restored with the rest of the state.

``train.trainable`` (a regex searched in param paths such as ``layers/moe/router/kernel``) trains a
part of the model: the optimizer is then an ``optax.multi_transform`` whose frozen partition is
``set_to_zero`` (no update, no Adam moments, no weight decay), and gradient clipping and the
``grad_norm`` metric see the trained params only. "" keeps the plain optimizer (and its state layout).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btx_jax import checkpoint, sharding
from btx_jax.config import ConfigError
from btx_jax.models.transformer import Transformer, TransformerConfig


def build_model(config, seed: int = 0) -> Transformer:
    """The model of a full config (its `model` and `moe` sections)."""
    return Transformer(TransformerConfig.from_config(config.model, config.get("moe")), nnx.Rngs(seed))


def schedule_numbers(optim_config, steps: int) -> np.ndarray:
    """[lr, warmup_steps, steps, min_lr_ratio] as float32: everything the schedule depends on. The train step
    takes them as an input rather than as constants compiled into it, so stages that differ only in length
    or learning rate (a recipe's seed, branches and baselines; most tests) share one compiled step."""
    return np.asarray([optim_config.lr, optim_config.warmup_steps, steps, optim_config.min_lr_ratio], np.float32)


def schedule(numbers) -> optax.Schedule:
    """Linear warmup from lr / (warmup + 1) to lr (the first step already moves), then cosine decay to
    lr * min_lr_ratio at `steps`: ``optax.warmup_cosine_decay_schedule`` in array arithmetic, so that
    `numbers` (:func:`schedule_numbers`) may be traced."""
    lr, warmup, total, min_ratio = (numbers[i] for i in range(4))

    def at(count):
        on_host = isinstance(numbers, np.ndarray) and not isinstance(count, jax.Array)
        xp = np if on_host else jnp  # on the host (logging) numpy: no op to compile
        count = xp.asarray(count, xp.float32)
        warming = (lr / (warmup + 1) - lr) * (1 - xp.clip(count, 0, warmup) / xp.maximum(warmup, 1)) + lr
        cosine = 0.5 * (1 + xp.cos(xp.pi * xp.minimum(count - warmup, total - warmup) / (total - warmup)))
        return xp.where(count < warmup, warming, lr * ((1 - min_ratio) * cosine + min_ratio))

    return at


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales (whatever their stacked rank)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", params)


def param_path(path) -> str:
    """A params-tree key path as the string ``train.trainable`` is matched against: ``layers/moe/router/kernel``."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def trainable_mask(params, pattern: str) -> dict | None:
    """A tree like `params` of bools, True where ``re.search(pattern, path)`` (a trained param); None for "".
    A pattern that matches no param is a ConfigError that lists the paths (stacked layers keep them few):
    it would train nothing."""
    if not pattern:
        return None
    regex = re.compile(pattern)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(param_path(path))), params)
    if not any(jax.tree.leaves(mask)):
        paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ConfigError("train.trainable", f"{pattern!r} matches no parameter of this model",
                          f"match some of its param paths: {', '.join(paths[:24])}{', ...' if len(paths) > 24 else ''}")
    return mask


def optimizer(optim_config, learning_rate: optax.Schedule, trainable: dict | None = None) -> optax.GradientTransformation:
    """Clipped AdamW; with a `trainable` mask (see :func:`trainable_mask`) only on the True leaves, the
    others frozen by ``set_to_zero`` (so they hold no optimizer state and the clipping norm skips them)."""
    tx = optax.chain(
        optax.clip_by_global_norm(optim_config.grad_clip),
        optax.adamw(learning_rate, b1=optim_config.b1, b2=optim_config.b2,
                    eps=optim_config.eps, weight_decay=optim_config.weight_decay, mask=_decay_mask))
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "trained" if t else "frozen", trainable)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


@dataclasses.dataclass
class TrainSetup:
    """Everything the step functions need that is not an array."""

    graphdef: nnx.GraphDef
    make_tx: Callable[[optax.Schedule], optax.GradientTransformation]  # the optimizer for a learning-rate schedule
    schedule_numbers: np.ndarray  # this run's schedule (see schedule_numbers), an input of the train step
    mesh: Mesh
    abstract_params: dict  # ShapeDtypeStruct leaves carrying their NamedSharding
    state_shardings: dict
    router_bias_shape: tuple[int, int] | None = None  # (L_moe, E) with moe.balance="bias", else None
    trainable: dict | None = None  # params-like tree of bools with train.trainable (True: trained), else None

    @property
    def tx(self) -> optax.GradientTransformation:
        """The optimizer with this run's schedule as constants (its state's structure is the same for any schedule)."""
        return self.make_tx(schedule(self.schedule_numbers))

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with shardings: targets for restoring onto this mesh."""
        shapes = jax.eval_shape(self._init_opt, self.abstract_params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def _init_opt(self, params):
        state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if self.router_bias_shape is not None:
            state["router_bias"] = jnp.zeros(self.router_bias_shape, jnp.float32)
        return state

    def init_state(self, params: dict) -> dict:
        """Fresh optimizer state (and a zero router bias) around the given (already sharded) params."""
        return jax.jit(self._init_opt, out_shardings=self.state_shardings)(params)


def make_setup(config, mesh: Mesh) -> TrainSetup:
    """Abstract model on the mesh (no memory used) and the shardings of every state leaf."""
    with sharding.use_mesh(mesh):
        graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: build_model(config)))
        param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abs_state, mesh))
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   nnx.to_pure_dict(abs_state), param_shardings)
    trainable = trainable_mask(abstract_params, config.train.get("trainable", ""))
    make_tx = functools.partial(optimizer, config.optim, trainable=trainable)
    numbers = schedule_numbers(config.optim, config.train.steps)
    tx = make_tx(schedule(numbers))
    opt_shardings = optax.tree_map_params(  # a frozen param's place in the state is an empty MaskedNode: kept
        tx, lambda v, s: v if isinstance(v, optax.MaskedNode) else s, jax.eval_shape(tx.init, abstract_params),
        param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": NamedSharding(mesh, P())}
    bias_shape = router_bias_shape(config)
    if bias_shape is not None:
        state_shardings["router_bias"] = NamedSharding(mesh, P())
    return TrainSetup(graphdef, make_tx, numbers, mesh, abstract_params, state_shardings, bias_shape, trainable)


def router_bias_shape(config) -> tuple[int, int] | None:
    """(MoE layers, experts) when the config balances by selection bias, else None."""
    moe = config.get("moe")
    if moe is None or not moe.num_experts or moe.get("balance", "aux") != "bias":
        return None
    return config.model.num_layers // moe.moe_every, moe.num_experts


def init_params(config, setup: TrainSetup, seed: int) -> dict:
    """Random parameters created directly in their shards (never whole on one device)."""
    def create():
        return nnx.to_pure_dict(nnx.state(build_model(config, seed)))

    shardings = jax.tree.map(lambda a: a.sharding, setup.abstract_params)
    with sharding.use_mesh(setup.mesh):
        return jax.jit(create, out_shardings=shardings)()


def param_count(abstract_params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params))


def _state_metadata(directory: epath.Path) -> dict:
    return ocp.PyTreeCheckpointer().metadata(directory).item_metadata.tree


def checkpoint_state_keys(path) -> set[str]:
    """The top-level entries of a checkpoint's state (``params``, ``opt_state``, ``step``, ``router_bias``...)."""
    return set(_state_metadata(epath.Path(checkpoint.step_dir(path)) / "state"))


def saved_router_bias(path, mesh: Mesh) -> jax.Array | None:
    """The ``router_bias`` of a checkpoint (workdir, checkpoints/ or step dir), replicated on `mesh`; None
    when it has none (dense, surgeon output, or trained without moe.balance="bias").

    Evaluating a checkpoint of a bias-balanced run needs it: the bias decides the routing."""
    directory = epath.Path(checkpoint.step_dir(path)) / "state"
    meta = _state_metadata(directory)
    if "router_bias" not in meta:
        return None
    target = jax.ShapeDtypeStruct(tuple(meta["router_bias"].shape), jnp.float32, sharding=NamedSharding(mesh, P()))
    restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
        item={"router_bias": target}, restore_args={"router_bias": ocp.ArrayRestoreArgs(sharding=target.sharding)},
        partial_restore=True))
    return restored["router_bias"]

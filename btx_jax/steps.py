"""The jitted train and eval steps: next-token cross entropy over packed rows, plus MoE router losses.

With ``moe.balance="bias"`` the train state also holds the routers' selection bias
(``state["router_bias"]`` [L_moe, E]): every forward pass routes with it, and each train step
moves it by the step's global expert load (:func:`btx_jax.models.router.update_bias`) after the
optimizer update, outside the gradient and the optimizer.
"""
from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from btx_jax import sharding, state as state_lib
from btx_jax.models import router
from btx_jax.models.moe import masked_indices
from btx_jax.state import TrainSetup


@jax.custom_vjp
def token_nll(logits, targets):
    """logits [..., V] float32, targets [...] -> (-log p(target), log Z), each [...].

    The gradient is written by hand, softmax * (g_nll + g_log_z) - one_hot(target) * g_nll, so
    the backward keeps only the logits and log Z: the differentiated logsumexp and target gather
    kept a second array of the step's largest shape ([B, T, vocab] float32), 364 -> 234 MB of XLA's
    temporaries in tests/test_scale.py's step. The speed on CPU is the same (XLA fused both)."""
    return _token_nll_forward(logits, targets)[0]


def _token_nll_forward(logits, targets):
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (nll, log_z), (logits, targets, log_z)


def _token_nll_backward(residuals, cotangents):
    logits, targets, log_z = residuals
    g_nll, g_log_z = cotangents
    target = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) == targets[..., None]
    softmax = jnp.exp(logits - log_z[..., None])
    d_logits = softmax * (g_nll + g_log_z)[..., None] - jnp.where(target, g_nll[..., None], 0.0)
    return d_logits.astype(logits.dtype), None


token_nll.defvjp(_token_nll_forward, _token_nll_backward)


def lm_loss(logits, batch, z_loss: float = 0.0, tokens=None):
    """Mean token cross entropy over loss_mask, plus z_loss * log(Z)^2 (keeps logits bounded).

    `tokens` is the mean's denominator, by default this batch's loss tokens; a microbatch passes
    its whole step's, so that the microbatches' losses (and gradients) add up to the step's."""
    nll, log_z = token_nll(logits, batch["targets"])
    mask = batch["loss_mask"]
    tokens = jnp.maximum(mask.sum(), 1.0) if tokens is None else tokens
    ce = (nll * mask).sum() / tokens
    zl = z_loss * (jnp.square(log_z) * mask).sum() / tokens
    return ce + zl, {"loss": ce, "z_loss": zl}


def forward(graphdef, params, batch, *, train: bool = False, rng=None, probe: bool = False, router_bias=None,
            expert_keep=None):
    """-> (logits, per-layer MoE aux: {name: [L_moe, ...]}, empty for a dense model).
    `router_bias` [L_moe, E]: the state's selection bias (moe.balance="bias"); None routes without one.
    `expert_keep` [E] bool: experts masked by an input (False), on top of moe.masked_experts."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], batch["segment_ids"], batch["positions"], train=train, rng=rng, probe=probe,
                 router_bias=router_bias, expert_keep=expert_keep)


BALANCE_LOSSES = {"aux": "load_balance_loss", "sequence": "sequence_balance_loss", "bias": None}


def loss_weights(moe_config) -> np.ndarray:
    """[router_z_weight, load_balance_weight] as float32 (zeros without a ``moe`` section). Like the schedule's numbers
    (:func:`btx_jax.state.schedule_numbers`) they are an input of the train step, not constants compiled into
    it, so runs that differ only in them (the recipe's no-load-balance variant, a sweep of the weights) share
    one compiled program."""
    if moe_config is None:
        return np.zeros(2, np.float32)
    return np.asarray([moe_config.router_z_weight, moe_config.load_balance_weight], np.float32)


def moe_loss(aux: dict, moe_config, weights=None) -> tuple[jax.Array, dict]:
    """Weighted router losses (each averaged over MoE layers) and the per-layer metrics to log.

    The balancing term follows ``moe.balance``: the batch's Switch loss (aux), its per-sequence
    form (sequence), or none (bias: the selection bias balances instead); the z-loss always applies.
    `weights`: :func:`loss_weights` (traced, in the train step); None takes them from `moe_config`.
    """
    if not aux:
        return jnp.zeros(()), {}
    z_weight, balance_weight = loss_weights(moe_config) if weights is None else (weights[0], weights[1])
    loss = z_weight * aux["router_z_loss"].mean()
    balance_loss = BALANCE_LOSSES[moe_config.get("balance", "aux")]
    if balance_loss is not None:
        loss = loss + balance_weight * aux[balance_loss].mean()
    return loss, {f"moe/{name}": value for name, value in aux.items()}


def token_totals(batch) -> dict:
    """The step's denominators: loss tokens (the LM loss) and non-padding tokens (what the router sees)."""
    return {"loss": jnp.maximum(batch["loss_mask"].sum(), 1.0),
            "routed": jnp.maximum((batch["segment_ids"] != 0).sum().astype(jnp.float32), 1.0)}


def make_loss_fn(graphdef, config):
    """(params, microbatch, rng, totals, router_bias=None, weights=None) -> (loss, metrics): this microbatch's
    share of the step's loss; `weights` are the router losses' (:func:`loss_weights`; None: the config's).

    The NLL is summed over the microbatch and divided by the *step's* loss tokens, so the shares
    (and their gradients) add up exactly to the full batch's mean. Router losses and ``moe/*``
    metrics are the microbatch's own per-layer values weighted by its share of the step's
    non-padding tokens: exact for token means (router z-loss, entropy, confidence, dropped
    fraction), while the load-balancing loss, a product of two batch means, becomes the
    token-weighted average of each microbatch's loss (as with per-group balancing; the sequence loss,
    a mean over rows, becomes a token-weighted one); with grad_accum = 1 every share is 1 and all of
    it is the full batch's. ``moe/expert_load``, a token mean, is exact: the bias update sees the step's load.
    """
    def loss_fn(params, batch, rng, totals, router_bias=None, weights=None):
        logits, aux = forward(graphdef, params, batch, train=True, rng=rng, router_bias=router_bias)
        loss, metrics = lm_loss(logits, batch, config.optim.z_loss, tokens=totals["loss"])
        router_loss, moe_metrics = moe_loss(aux, config.get("moe"), weights)
        share = (batch["segment_ids"] != 0).sum().astype(jnp.float32) / totals["routed"]
        return loss + share * router_loss, metrics | jax.tree.map(lambda v: share * v, moe_metrics)

    return loss_fn


def _microbatches(batch: dict, count: int) -> dict:
    """[B, ...] -> [count, B / count, ...] with microbatch i = rows i, i + count, ...: every device keeps
    its own rows (a reshape of its shard, no communication) and each microbatch stays split over the batch axes."""
    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, None, "batch", *([None] * (x.ndim - 2)))
    return jax.tree.map(split, batch)


def accumulate(grad_fn, params, batch, rng, count: int, param_shardings, router_bias=None, weights=None):
    """Sum of `grad_fn`'s (grads, metrics) over `count` microbatches (a scan; `count` = 1: one call).
    The share-weighted ``moe/expert_load`` summed this way is the whole step's load."""
    totals = token_totals(batch)
    if count == 1:
        (_, metrics), grads = grad_fn(params, batch, rng, totals, router_bias, weights)
        return grads, metrics

    def body(carry, inputs):
        index, micro = inputs
        (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index), totals, router_bias, weights)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    micro = _microbatches(batch, count)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, totals, router_bias, weights))
    (_, metric_shapes), grad_shapes = shapes
    zeros = jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(jnp.zeros(s.shape, s.dtype), sh),
                         grad_shapes, param_shardings)
    init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
    (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(count), micro))
    return grads, metrics


def make_train_step(setup: TrainSetup, batch_shardings: dict, config):
    """(state, batch) -> (state, metrics), jitted with the state's shardings and donated.

    With ``train.grad_accum`` = n the batch is n microbatches of batch_size / n rows, run one
    after another; their gradients are summed into one update equal to the full batch's (see
    :func:`make_loss_fn` for the router losses). Metrics are scalars, except ``moe/*`` entries:
    per MoE layer [L_moe] (``expert_usage`` [L_moe, E]; see :func:`balance_metrics`). With a
    ``router_bias`` in the state (moe.balance="bias") the bias is updated from the step's load.
    The learning-rate schedule's numbers (``setup.schedule_numbers``) and the router losses' weights
    (:func:`loss_weights`) are inputs of the compiled step, so runs that differ only in length, learning
    rate or those weights reuse one program; within a process they reuse the jitted step itself (see
    :func:`program_fields`), so a recipe's later stages skip tracing and lowering too.
    """
    base_key = jax.random.key(config.train.seed)
    grad_fn = jax.value_and_grad(make_loss_fn(setup.graphdef, config), has_aux=True)
    count = config.train.get("grad_accum", 1)

    def train_step(state, batch, schedule_numbers, weights):
        rng = jax.random.fold_in(base_key, state["step"])
        bias = state.get("router_bias")
        grads, metrics = accumulate(grad_fn, state["params"], batch, rng, count, setup.state_shardings["params"], bias,
                                    weights)
        tx = setup.make_tx(state_lib.schedule(schedule_numbers))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = grad_norm(grads, setup.trainable)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if bias is not None:  # after the step that used it: the next step routes with the new bias
            new_state["router_bias"] = router.update_bias(bias, metrics["moe/expert_load"], config.moe.bias_rate,
                                                          masked_indices(config.moe.get("masked_experts", "")))
        return new_state, balance_metrics(metrics, bias)

    replicated = NamedSharding(setup.mesh, P())
    in_shardings = (setup.state_shardings, batch_shardings, replicated, replicated)
    key = ("train", program_fields(config), setup.mesh, tuple(sorted(batch_shardings.items())))
    jitted = _reused(key, lambda: _under_mesh(jax.jit(train_step, in_shardings=in_shardings, donate_argnums=0,
                                                      out_shardings=(setup.state_shardings, None)), setup.mesh))
    numbers = jax.device_put(setup.schedule_numbers, replicated)
    weights = jax.device_put(loss_weights(config.get("moe")), replicated)

    def step(state, batch):
        return jitted(state, batch, numbers, weights)

    step.lower = lambda state, batch: jitted.lower(state, batch, numbers, weights)
    return step


def grad_norm(grads, trainable=None) -> jax.Array:
    """The global gradient norm over the trained params (`trainable`: train.trainable's mask; None: all):
    the frozen ones' gradients are never applied, so they would only hide the norm that is clipped."""
    if trainable is None:
        return optax.tree.norm(grads)
    return optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t])


def balance_metrics(metrics: dict, bias=None) -> dict:
    """Replaces ``moe/expert_load`` [L_moe, E] by per-layer entries the metrics writer logs like the others:
    ``moe/expert_load/<e>`` (expert e's share of the routing choices, before drops), ``moe/load_imbalance``
    (max load / mean load: 1 is perfect balance) and, with a selection bias, ``moe/bias_spread``
    (max - min of the bias the step routed with)."""
    if "moe/expert_load" not in metrics:
        return metrics
    load = metrics.pop("moe/expert_load")
    metrics["moe/load_imbalance"] = load.max(axis=-1) / jnp.maximum(load.mean(axis=-1), 1e-9)
    metrics.update({f"moe/expert_load/{e}": load[:, e] for e in range(load.shape[-1])})
    if bias is not None:
        metrics["moe/bias_spread"] = bias.max(axis=-1) - bias.min(axis=-1)
    return metrics


def make_eval_step(setup: TrainSetup, batch_shardings: dict):
    """(params, batch, router_bias=None) -> (sum of token NLL, number of tokens); pass the state's
    ``router_bias`` (by keyword) when it has one: the bias is part of the model's routing."""
    def eval_step(params, batch, router_bias=None):
        logits, _ = forward(setup.graphdef, params, batch, router_bias=router_bias)
        nll, _ = token_nll(logits, batch["targets"])
        return (nll * batch["loss_mask"]).sum(), batch["loss_mask"].sum()

    key = ("eval", setup.graphdef, setup.mesh, tuple(sorted(batch_shardings.items())))
    jitted = _reused(key, lambda: _under_mesh(
        jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], batch_shardings, None)), setup.mesh))
    return lambda params, batch, router_bias=None: jitted(params, batch, router_bias)


# Fields that never reach a compiled step: the schedule's numbers and the router losses' weights are its inputs
# (schedule_numbers, loss_weights), the rest is read by the host only.
NOT_IN_PROGRAM = {"optim": ("lr", "warmup_steps", "min_lr_ratio"),
                  "moe": ("router_z_weight", "load_balance_weight"),
                  "train": ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                            "init_from", "peak_flops")}
PROGRAM_SECTIONS = ("model", "moe", "optim", "train", "mesh")
_KEPT_PROGRAMS = 8
_programs: collections.OrderedDict = collections.OrderedDict()


def program_fields(config) -> str:
    """The config fields a train step is compiled from, as JSON: every field of its sections except those in
    NOT_IN_PROGRAM (a field added to the config is in the key until it is listed there: two configs that differ
    in it at worst compile twice, never share a program they should not)."""
    fields = {name: {k: v for k, v in config[name].to_dict().items() if k not in NOT_IN_PROGRAM.get(name, ())}
              for name in PROGRAM_SECTIONS if name in config}
    return json.dumps(fields, sort_keys=True, default=str)


def _reused(key, make):
    """The jitted step of `key` made earlier in this process (the last few are kept), else `make()`: a recipe
    trains a dozen stages of a few shapes in one process, and a new jitted function would trace, lower and
    load its program again (3.8 s for the demo's MoE train step with the compilation cache warm).
    Like any module-level jitted function, a program traced once does not see later monkeypatching of model
    code; :func:`clear_programs` forgets them."""
    if key in _programs:
        _programs.move_to_end(key)
        return _programs[key]
    _programs[key] = made = make()
    while len(_programs) > _KEPT_PROGRAMS:
        _programs.popitem(last=False)
    return made


def clear_programs() -> None:
    """Forgets the jitted steps kept by :func:`_reused` (the next make_*_step traces afresh)."""
    _programs.clear()


def with_router_bias(fn, router_bias, expert_keep=None):
    """(params, batch) -> fn(params, batch, router_bias[, expert_keep]): an eval step or token scorer bound to a
    model's selection bias (None for models without one) and, for a token scorer, an expert mask, for callers
    that pass (params, batch)."""
    if expert_keep is None:
        return lambda params, batch: fn(params, batch, router_bias)
    return lambda params, batch: fn(params, batch, router_bias, expert_keep)


def _under_mesh(fn, mesh):
    """Runs (and traces) `fn` with the mesh and logical rules in scope; ``.lower(*args)`` lowers the
    jitted `fn` there (ahead-of-time compilation, e.g. for XLA's memory analysis)."""
    def wrapped(*args):
        with sharding.use_mesh(mesh):
            return fn(*args)

    def lower(*args):
        with sharding.use_mesh(mesh):
            return fn.lower(*args)

    wrapped.lower = lower
    return wrapped


def batch_shardings(mesh) -> dict:
    return {k: sharding.batch_sharding(mesh, 1 if k == "domain" else 2)
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "domain")}


def to_global(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global jax.Arrays sharded over the batch axes (host-only keys such as
    ``document`` stay behind)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items() if k in shardings}

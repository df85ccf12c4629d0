"""The jitted train and eval steps: next-token cross entropy over packed rows, plus MoE router losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from btx_jax import sharding
from btx_jax.state import TrainSetup


def lm_loss(logits, batch, z_loss: float = 0.0):
    """Mean token cross entropy over loss_mask, plus z_loss * log(Z)^2 (keeps logits bounded)."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    mask = batch["loss_mask"]
    tokens = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / tokens
    zl = z_loss * (jnp.square(log_z) * mask).sum() / tokens
    return ce + zl, {"loss": ce, "z_loss": zl}


def forward(graphdef, params, batch, *, train: bool = False, rng=None, probe: bool = False):
    """-> (logits, per-layer MoE aux: {name: [L_moe, ...]}, empty for a dense model)."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], batch["segment_ids"], batch["positions"], train=train, rng=rng, probe=probe)


def moe_loss(aux: dict, moe_config) -> tuple[jax.Array, dict]:
    """Weighted router losses (each averaged over MoE layers) and the per-layer metrics to log."""
    if not aux:
        return jnp.zeros(()), {}
    loss = (moe_config.load_balance_weight * aux["load_balance_loss"].mean()
            + moe_config.router_z_weight * aux["router_z_loss"].mean())
    return loss, {f"moe/{name}": value for name, value in aux.items()}


def make_train_step(setup: TrainSetup, batch_shardings: dict, config):
    """(state, batch) -> (state, metrics), jitted with the state's shardings and donated.

    Metrics are scalars, except ``moe/*`` entries: per MoE layer [L_moe] (``expert_usage`` [L_moe, E]).
    """
    base_key = jax.random.key(config.train.seed)

    def loss_fn(params, batch, rng):
        logits, aux = forward(setup.graphdef, params, batch, train=True, rng=rng)
        loss, metrics = lm_loss(logits, batch, config.optim.z_loss)
        router_loss, moe_metrics = moe_loss(aux, config.get("moe"))
        return loss + router_loss, metrics | moe_metrics

    def train_step(state, batch):
        rng = jax.random.fold_in(base_key, state["step"])
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    jitted = jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                     out_shardings=(setup.state_shardings, None), donate_argnums=0)
    return _under_mesh(jitted, setup.mesh)


def make_eval_step(setup: TrainSetup, batch_shardings: dict):
    """(params, batch) -> (sum of token NLL, number of tokens)."""
    def eval_step(params, batch):
        logits, _ = forward(setup.graphdef, params, batch)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        return (nll * batch["loss_mask"]).sum(), batch["loss_mask"].sum()

    jitted = jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], batch_shardings))
    return _under_mesh(jitted, setup.mesh)


def _under_mesh(fn, mesh):
    """Runs (and traces) `fn` with the mesh and logical rules in scope."""
    def wrapped(*args):
        with sharding.use_mesh(mesh):
            return fn(*args)
    return wrapped


def batch_shardings(mesh) -> dict:
    return {k: sharding.batch_sharding(mesh, 1 if k == "domain" else 2)
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "domain")}


def to_global(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global jax.Arrays sharded over the batch axes (host-only keys such as
    ``document`` stay behind)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items() if k in shardings}

"""Token-choice top-k routing in float32, the capacity plan, and the router's losses and metrics.

Everything here runs under GSPMD on the global token array, so the auxiliary losses and
metrics are global means whatever the mesh: no hand-written psum can be forgotten.

Load balancing (``moe.balance``) comes in three forms: ``aux``, the Switch loss over the batch
(:func:`router_losses`); ``sequence``, the same product per sequence (:func:`sequence_balance_loss`,
DeepSeek-V3's sequence-wise loss); ``bias``, DeepSeek-V3's auxiliary-loss-free balancing: a
per-expert bias added to the scores for the top-k *selection* only (:func:`route`), moved after
every step against the load it caused (:func:`update_bias`), with no gradient anywhere.

Masked experts (``moe.masked_experts``, FlexOlmo's opt-out): their logits are -inf before the
softmax, so they get probability 0, the other experts' probabilities renormalise among themselves,
and they are never chosen, with or without a bias: the layer computes what an MoE without them would.

Axis letters: G routing groups, S tokens per group, D model, E experts, K = top_k, C capacity.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for every token of every group."""

    experts: jax.Array   # [G, S, K] int32, chosen experts, best first
    weights: jax.Array   # [G, S, K] float32 gate values: top-1 the router probability, top-k renormalized when configured
    mask: jax.Array      # [G, S] bool, False for padding tokens (never routed)
    probs: jax.Array     # [G, S, E] float32 softmax over experts
    logits: jax.Array    # [G, S, E] float32


jax.tree_util.register_dataclass(Routing, data_fields=["experts", "weights", "mask", "probs", "logits"], meta_fields=[])


def kept_experts(num_experts: int, masked: tuple[int, ...]) -> np.ndarray:
    """[E] bool, False at the masked (opted-out) experts."""
    keep = np.ones(num_experts, bool)
    keep[list(masked)] = False
    return keep


def route(x: jax.Array, kernel: jax.Array, mask: jax.Array, *, top_k: int, renormalize: bool,
          jitter: float = 0.0, rng: jax.Array | None = None, bias: jax.Array | None = None,
          masked: tuple[int, ...] = (), keep: jax.Array | None = None) -> Routing:
    """x [G, S, D] -> top-k experts. The router is computed in float32 whatever the compute dtype.

    Gates: for top_k == 1 the gate is the router probability p itself, whatever `renormalize`
    (Switch Transformer): renormalizing one weight would make it p / p = 1, a constant through
    which the LM loss gives the router no gradient. For top_k > 1 with `renormalize` the top-k
    probabilities are divided by their sum (so an MoE whose experts are copies of one FFN equals
    that FFN; with top-1 it gives p * FFN), otherwise they are the raw probabilities.

    `bias` [E] (balance="bias") is added to the probabilities to *choose* the top-k only; the gates
    are still the unbiased probabilities of the chosen experts (renormalized as above), so the bias
    steers where tokens go without changing what an expert's output is worth (DeepSeek-V3).

    `masked`: experts that must never be chosen (opted out). Their logits are -inf, so the softmax
    renormalises over the others, and the choice excludes them even where a probability underflows
    to 0 or a bias would favour them; at least top_k experts must be left. `keep` [E] bool, when given,
    is the mask as an array (False: masked) in place of `masked`, so one compiled program serves every
    mask (the recipe's opt-out rows).
    """
    x32 = x.astype(jnp.float32)
    if jitter > 0.0:
        x32 = x32 * jax.random.uniform(rng, x32.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
    logits = jnp.einsum("gsd,de->gse", x32, kernel.astype(jnp.float32))
    if keep is None and masked:
        keep = kept_experts(logits.shape[-1], masked)
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if bias is None and keep is None:
        weights, experts = jax.lax.top_k(probs, top_k)
    else:
        scores = probs if bias is None else probs + bias.astype(jnp.float32)
        if keep is not None:
            scores = jnp.where(keep, scores, -jnp.inf)
        _, experts = jax.lax.top_k(scores, top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalize and top_k > 1:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights, mask, probs, logits)


def capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """ceil(k * tokens * cf / E), rounded up to a multiple of 4 (at least 4)."""
    c = math.ceil(top_k * tokens_per_group * capacity_factor / num_experts)
    return max(4, -(-c // 4) * 4)


def slot_positions(routing: Routing, num_experts: int, priority: str = "token") -> jax.Array:
    """Each choice's position in its expert's queue [G, S, K] (padding tokens: a huge value).

    priority="token": every token's first choice is queued before any second choice, then in
    token order (GShard). priority="confidence": as "token", but tokens are taken in order of
    their top-1 router probability, highest first (batch-prioritized routing, V-MoE).
    """
    experts, mask = routing.experts, routing.mask
    g, s, k = experts.shape
    order = None
    if priority == "confidence":
        confidence = jnp.max(routing.probs, axis=-1)
        order = jnp.argsort(-jnp.where(mask, confidence, -1.0), axis=1, stable=True)  # [G, S]
        experts = jnp.take_along_axis(experts, order[..., None], axis=1)
        mask = jnp.take_along_axis(mask, order, axis=1)
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * mask[..., None, None]  # [G, S, K, E]
    queue = one_hot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)  # choice-major, then token order
    position = jnp.sum((jnp.cumsum(queue, axis=1) - 1) * queue, axis=-1).reshape(g, k, s).transpose(0, 2, 1)
    position = jnp.where(mask[..., None], position, jnp.iinfo(jnp.int32).max)
    if order is not None:
        position = jnp.zeros_like(position).at[jnp.arange(g)[:, None], order].set(position)
    return position


def router_losses(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Switch load-balancing loss E * sum_e f_e p_e and router z-loss, over non-padding tokens.

    f_e is the fraction of the K routing choices that picked expert e (before any drop),
    p_e the mean router probability of e; uniform routing gives exactly 1.
    """
    m = routing.mask.astype(jnp.float32)
    tokens = jnp.maximum(m.sum(), 1.0)
    top_k = routing.experts.shape[-1]
    chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=2)  # [G, S, E]
    f = jnp.einsum("gse,gs->e", chosen, m) / (tokens * top_k)
    p = jnp.einsum("gse,gs->e", routing.probs, m) / tokens
    log_z = jax.nn.logsumexp(routing.logits, axis=-1)
    return {"load_balance_loss": num_experts * jnp.sum(f * p),
            "router_z_loss": jnp.sum(jnp.square(log_z) * m) / tokens}


def sequence_balance_loss(routing: Routing, num_experts: int, sequences: int) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss: E * sum_e f_e p_e within each sequence, averaged over the
    sequences that hold a non-padding token.

    The batch-level loss is content with a batch whose sequences each use one expert, as long as
    the batch as a whole is balanced; this one asks every sequence to spread its own tokens. The
    groups are consecutive slices of the `sequences` rows ([G, S] reshapes to [rows, tokens]).
    """
    top_k = routing.experts.shape[-1]
    m = routing.mask.reshape(sequences, -1).astype(jnp.float32)  # [B, T]
    chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=2)
    chosen = chosen.reshape(sequences, -1, num_experts)
    probs = routing.probs.reshape(sequences, -1, num_experts)
    tokens = m.sum(axis=1)  # [B]
    f = jnp.einsum("bte,bt->be", chosen, m) / jnp.maximum(tokens * top_k, 1.0)[:, None]
    p = jnp.einsum("bte,bt->be", probs, m) / jnp.maximum(tokens, 1.0)[:, None]
    present = (tokens > 0).astype(jnp.float32)
    return jnp.sum(num_experts * jnp.sum(f * p, axis=-1) * present) / jnp.maximum(present.sum(), 1.0)


def update_bias(bias: jax.Array, load: jax.Array, rate: float, masked: tuple[int, ...] = ()) -> jax.Array:
    """b_e += rate * sign(mean load - load_e), per layer: bias and load [L, E], load the fraction of the
    step's routing choices (before drops) that went to each expert.

    A sign step, as in DeepSeek-V3: the size of the imbalance does not matter, so the bias moves
    at a known speed and settles into an oscillation of +-rate around the balancing value.
    `masked` experts (never chosen, load 0) are left out of the mean and keep their bias: counted,
    they would pull the mean below the fair share 1 / (E - masked) of the others.
    """
    keep = kept_experts(load.shape[-1], masked)
    mean = jnp.sum(jnp.where(keep, load, 0.0), axis=-1, keepdims=True) / keep.sum()
    return bias + rate * jnp.where(keep, jnp.sign(mean - load), 0.0).astype(bias.dtype)


def router_metrics(routing: Routing, kept: jax.Array, num_experts: int) -> dict[str, jax.Array]:
    """Per-layer routing statistics; `kept` [G, S, K] marks the choices that were not dropped."""
    m = routing.mask.astype(jnp.float32)
    tokens = jnp.maximum(m.sum(), 1.0)
    top_k = routing.experts.shape[-1]
    choices = m[..., None] * jnp.ones(routing.experts.shape, jnp.float32)
    kept = kept.astype(jnp.float32) * choices
    usage = jnp.einsum("gske,gsk->e", jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), kept)
    entropy = -jnp.sum(routing.probs * jnp.log(jnp.maximum(routing.probs, 1e-30)), axis=-1)
    return {
        "dropped_fraction": jnp.sum(choices - kept) / (tokens * top_k),
        "expert_usage": usage / jnp.maximum(usage.sum(), 1.0),  # [E], fraction of routed choices per expert
        # [E], fraction of all routing choices per expert before any drop: what the balancing acts on
        "expert_load": jnp.einsum("gske,gs->e", jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), m)
                       / (tokens * top_k),
        "router_entropy": jnp.sum(entropy * m) / tokens,
        "router_confidence": jnp.sum(jnp.max(routing.probs, axis=-1) * m) / tokens,
    }

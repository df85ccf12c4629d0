"""Dispatchers: move routed tokens to their experts, run the expert FFNs, combine the outputs.

All take the same inputs (tokens [G, S, D], a :class:`~btx_jax.models.router.Routing`, each
choice's queue position, the expert weights) and give the same result when nothing is
dropped; they differ in how the work is laid out:

- ``einsum``: GShard's dense one-hot dispatch/combine tensors [G, S, E, C]; GSPMD shards it.
- ``alltoall``: expert parallelism in ``jax.shard_map`` over the ``expert`` mesh axis: each
  device packs its tokens into fixed-capacity buffers [E, G, C, D] by gather, an all-to-all
  sends each expert's buffer to the device that holds it, and a second one brings results back.
- ``dropless``: no capacity; each device sorts its routing choices by expert and runs a
  grouped matmul (``ragged_dot`` on TPU/GPU, :mod:`grouped_ffn` blocks on CPU).
- ``reference``: a loop over experts applying each FFN to every token; the tests' yardstick.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from btx_jax.models.grouped_ffn import default_capacity, default_granule, grouped_ffn
from btx_jax.models.router import Routing
from btx_jax.sharding import BATCH_AXES, constrain


def expert_ffn(x, w, dtype, dropout: float = 0.0, rng=None):
    """SwiGLU per expert: x [E, ..., D], w = {gate, up: [E, D, F], down: [E, F, D]}.

    The rows of each expert are flattened to one axis ([E, N, D]) so every dot has a single
    contracting/free axis besides the expert batch axis (see transformer.Projection: XLA:CPU is
    much slower on the weight gradient of a dot that contracts over two axes)."""
    shape = x.shape
    x = x.astype(dtype).reshape(shape[0], -1, shape[-1])
    h = (jax.nn.silu(jnp.einsum("end,edf->enf", x, w["gate"].astype(dtype)))
         * jnp.einsum("end,edf->enf", x, w["up"].astype(dtype)))
    if dropout > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0).astype(dtype)
    return jnp.einsum("enf,efd->end", h, w["down"].astype(dtype)).reshape(shape)


def _gates(routing: Routing, kept: jax.Array, dtype) -> jax.Array:
    """Gate value of each choice, zero where the choice was dropped (or is padding)."""
    return jnp.where(kept, routing.weights, 0.0).astype(dtype)


def reference(x, routing: Routing, kept, w, *, dtype, **_):
    """sum_e gate_e(token) * FFN_e(token), every expert applied densely to every token."""
    out = jnp.zeros(x.shape, jnp.float32)
    gates = _gates(routing, kept, jnp.float32)
    for e in range(w["gate"].shape[0]):
        gate_e = jnp.sum(jnp.where(routing.experts == e, gates, 0.0), axis=-1)  # [G, S]
        y_e = expert_ffn(x[None], {k: v[e:e + 1] for k, v in w.items()}, dtype)[0]
        out = out + gate_e[..., None] * y_e.astype(jnp.float32)
    return out.astype(dtype)


def einsum(x, routing: Routing, kept, w, *, position, capacity, dtype, dropout=0.0, rng=None, **_):
    """GShard: dispatch = one_hot(expert) x one_hot(slot); combine = dispatch x gate."""
    num_experts = w["gate"].shape[0]
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=dtype)  # [G, S, K, C]; dropped: 0
    expert = jax.nn.one_hot(routing.experts, num_experts, dtype=dtype)  # [G, S, K, E]
    dispatch = jnp.einsum("gske,gskc->gsec", expert, slot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", expert, slot, _gates(routing, kept, dtype))
    xe = jnp.einsum("gsec,gsd->egcd", dispatch, x.astype(dtype))
    xe = constrain(xe, "act_expert", "act_expert_groups", None, "act_embed")
    ye = expert_ffn(xe, w, dtype, dropout, rng)
    ye = constrain(ye, "act_expert", "act_expert_groups", None, "act_embed")
    return jnp.einsum("gsec,egcd->gsd", combine, ye)


def _slots(routing: Routing, kept, position, capacity: int, num_experts: int):
    """Flat buffer slot (expert * C + position) of each choice; dropped choices -> E * C (a dump slot)."""
    return jnp.where(kept, routing.experts * capacity + position, num_experts * capacity)


def pack(x, routing: Routing, kept, position, capacity: int, num_experts: int):
    """Tokens [G, S, D] -> capacity buffers [E, G, C, D] by gather (empty slots are zero)."""
    g, s, d = x.shape
    slots = _slots(routing, kept, position, capacity, num_experts)
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], slots.shape)
    slot_token = jnp.full((g, num_experts * capacity + 1), s, jnp.int32)
    slot_token = slot_token.at[jnp.arange(g)[:, None, None], slots].set(token)[:, :-1]  # [G, E*C]; empty: s
    x_padded = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
    buffers = jnp.take_along_axis(x_padded, slot_token[..., None], axis=1)
    return buffers.reshape(g, num_experts, capacity, d).transpose(1, 0, 2, 3)


def unpack(y, routing: Routing, kept, position, capacity: int, dtype):
    """Expert outputs [E, G, C, D] -> tokens [G, S, D]: the gate-weighted sum over each token's choices."""
    e, g, c, d = y.shape
    flat = jnp.concatenate([y.transpose(1, 0, 2, 3).reshape(g, e * c, d), jnp.zeros((g, 1, d), y.dtype)], axis=1)
    slots = _slots(routing, kept, position, capacity, e)  # [G, S, K]
    picked = jnp.take_along_axis(flat, slots.reshape(g, -1)[..., None], axis=1).reshape(*slots.shape, d)
    return jnp.einsum("gskd,gsk->gsd", picked, _gates(routing, kept, dtype))


@jax.custom_vjp
def permute_rows(x, order, inverse):
    """x[order] for a permutation `order` whose inverse is `inverse`: the gradient is a gather by the
    inverse, where autodiff would scatter-add (XLA:CPU's scatter: 13 -> 4 ms for the sort and unsort of
    4,096 rows of width 512, fwd+bwd)."""
    return x[order]


def _permute_rows_fwd(x, order, inverse):
    return x[order], inverse


def _permute_rows_bwd(inverse, g):
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def inverse_permutation(order):
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _resolve(impl: str) -> str:
    return ("blocks" if jax.default_backend() == "cpu" else "native") if impl == "auto" else impl


def _filled_buffers_ffn(buffers, filled, w, *, expected_rows: float, block: int, dtype):
    """Expert FFN on capacity buffers [E, G, C, D] whose first `filled[e, g]` slots hold tokens:
    the filled rows are compacted (still in expert order) for :func:`grouped_ffn`, so the
    capacity slack costs no FLOPs. Its batched part holds `expected_rows` per expert (an expert's
    share of the routed choices), not the G * C slots."""
    e, g, c, d = buffers.shape
    slot_filled = (jnp.arange(c)[None, None, :] < filled[..., None]).reshape(-1)
    order = jnp.argsort(~slot_filled, stable=True)  # filled slots first, expert-major
    inverse = inverse_permutation(order)
    rows = permute_rows(buffers.reshape(-1, d).astype(dtype), order, inverse)
    granule = default_granule(block, int(expected_rows * e), e)
    y = grouped_ffn(rows, filled.sum(axis=1), w["gate"].astype(dtype), w["up"].astype(dtype),
                    w["down"].astype(dtype), block, granule, default_capacity(expected_rows, granule))
    return permute_rows(y, inverse, order).reshape(e, g, c, d)


def alltoall(x, routing: Routing, kept, w, *, position, capacity, dtype, dropout=0.0, rng=None,
             impl: str = "auto", block: int = 128, **_):
    """Expert parallel: experts split over the `expert` mesh axis, tokens exchanged by all-to-all."""
    num_experts = w["gate"].shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    ways = 1 if mesh.empty else mesh.shape["expert"]
    skip_empty = _resolve(impl) == "blocks" and dropout == 0.0

    def local(x, routing, kept, position, w, rng):
        buffers = pack(x.astype(dtype), routing, kept, position, capacity, num_experts)  # [E, G_local, C, D]
        filled = jnp.einsum("gske,gsk->eg", jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.int32),
                            kept.astype(jnp.int32))  # [E, G_local] tokens in each buffer
        if ways > 1:  # [E, G_local, C, D] -> [E / ways, ways * G_local, C, D]: my experts, everyone's tokens
            buffers = jax.lax.all_to_all(buffers, "expert", split_axis=0, concat_axis=1, tiled=True)
            filled = jax.lax.all_to_all(filled, "expert", split_axis=0, concat_axis=1, tiled=True)
            rng = None if rng is None else jax.random.fold_in(rng, jax.lax.axis_index("expert"))
        if skip_empty:
            # every group's S * K choices spread over all E experts (this device holds E / ways of them)
            expected = buffers.shape[1] * routing.experts.shape[1] * routing.experts.shape[2] / num_experts
            y = _filled_buffers_ffn(buffers, filled, w, expected_rows=expected, block=block, dtype=dtype)
        else:
            y = expert_ffn(buffers, w, dtype, dropout, rng)
        if ways > 1:
            y = jax.lax.all_to_all(y, "expert", split_axis=1, concat_axis=0, tiled=True)
        return unpack(y, routing, kept, position, capacity, dtype)

    if mesh.empty or ways == 1:
        return local(x, routing, kept, position, w, rng)
    tokens = P("expert")
    weights = {k: P("expert") for k in w}
    fn = jax.shard_map(local, mesh=mesh, axis_names={"expert"}, check_vma=not skip_empty,  # see dropless()
                       in_specs=(tokens, tokens, tokens, tokens, weights, P()), out_specs=tokens)
    return fn(x, routing, kept, position, w, rng)


def _sort_by_expert(experts, mask, num_experts: int):
    """Flattened choices [A] sorted by expert (padding last): order, its inverse, per-expert counts."""
    flat = jnp.where(mask[:, None], experts, num_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat].add(1)[:num_experts]
    return flat, order, inverse_permutation(order), counts


def _choice_rows(x, k: int, order, inverse, dtype):
    """Tokens [N, D] -> one row per choice [N * K, D], sorted by expert (`order` sorts the flattened [N, K]
    choices): one gather of token order // K, without the [N * K, D] repeat in between."""
    return _gather_choices(x.astype(dtype), order, inverse, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_choices(x, order, inverse, k):
    return x[order // k]


def _gather_choices_fwd(x, order, inverse, k):
    return x[order // k], inverse


def _gather_choices_bwd(k, inverse, g):
    """Each token's gradient: the sum over its K choices, gathered back into token order (no scatter-add)."""
    return g[inverse].reshape(-1, k, g.shape[-1]).sum(axis=1), None, None


_gather_choices.defvjp(_gather_choices_fwd, _gather_choices_bwd)


def _dropless_blocks(x, experts, gates, mask, w, *, block: int, dtype):
    """CPU grouped matmul (:mod:`grouped_ffn`) over the expert-sorted rows."""
    n, d = x.shape
    num_experts = w["gate"].shape[0]
    flat, order, inverse, counts = _sort_by_expert(experts, mask, num_experts)
    rows = _choice_rows(x, experts.shape[1], order, inverse, dtype)
    y = grouped_ffn(rows, counts, w["gate"].astype(dtype), w["up"].astype(dtype), w["down"].astype(dtype), block)
    y = permute_rows(y, inverse, order).reshape(*experts.shape, d)
    return jnp.einsum("nkd,nk->nd", y, gates)


def _dropless_ragged(x, experts, gates, mask, w, *, dtype, **_):
    """TPU/GPU grouped matmul: `jax.lax.ragged_dot` over the expert-sorted rows."""
    n, d = x.shape
    num_experts = w["gate"].shape[0]
    flat, order, inverse, counts = _sort_by_expert(experts, mask, num_experts)
    rows = _choice_rows(x, experts.shape[1], order, inverse, dtype)
    h = (jax.nn.silu(jax.lax.ragged_dot(rows, w["gate"].astype(dtype), counts))
         * jax.lax.ragged_dot(rows, w["up"].astype(dtype), counts))
    y = jax.lax.ragged_dot(h, w["down"].astype(dtype), counts)
    y = jnp.where((flat[order] < num_experts)[:, None], y, 0.0)  # rows past the groups are undefined
    y = permute_rows(y, inverse, order).reshape(*experts.shape, d)
    return jnp.einsum("nkd,nk->nd", y, gates)


def dropless(x, routing: Routing, kept, w, *, dtype, impl: str = "auto", block: int = 128, **_):
    """No capacity: every choice is computed. Each device sorts its own tokens (shard_map over the batch axes)."""
    compute = _dropless_ragged if _resolve(impl) == "native" else _dropless_blocks

    def local(x, routing, kept, w):
        g, s, d = x.shape
        k = routing.experts.shape[-1]
        y = compute(x.reshape(g * s, d), routing.experts.reshape(g * s, k), _gates(routing, kept, dtype).reshape(g * s, k),
                    routing.mask.reshape(g * s), w, dtype=dtype, block=block)
        return y.reshape(g, s, d)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(mesh.shape[a] == 1 for a in BATCH_AXES):
        return local(x, routing, kept, w)
    tokens = P(BATCH_AXES)
    # check_vma=False: the hand-written grouped_ffn backward does not track varying axes; the
    # weights' gradients are still summed over the batch axes by shard_map's transpose.
    fn = jax.shard_map(local, mesh=mesh, axis_names=set(BATCH_AXES), check_vma=False,
                       in_specs=(tokens, tokens, tokens, {k: P() for k in w}), out_specs=tokens)
    return fn(x, routing, kept, w)


DISPATCHERS = {"einsum": einsum, "alltoall": alltoall, "dropless": dropless, "reference": reference}

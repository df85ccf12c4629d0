"""A grouped SwiGLU FFN over rows sorted by expert: the expert compute of dropless (and alltoall) on CPU.

`jax.lax.ragged_dot` lowers natively only on TPU/GPU; on CPU it is masked-dense, so every
expert multiplies every row and the cost grows with E. Here a loop over experts takes each
expert's weights once and walks its rows in blocks: the rows past its last full block in one
block rounded up to a multiple of `granule` rows (a `lax.switch` over the block/granule
possible sizes), then as many full blocks of `block` rows as fit, so each expert costs at most
one block call beyond its full blocks and computes fewer than `granule` rows in vain. Every block call
re-reads the expert's weights and adds to its [D, F] weight gradients, so the number of calls,
not the rows, is what grows with E (README, "Benchmark").

Experts are visited in order, so an expert's rounded-up block may spill into rows of the
experts after it: those rows are rewritten when their own expert is processed (and masked out
of this expert's weight gradients). The backward pass is written by hand: weight gradients
start from the rounded-up block's dots, accumulate over the full blocks in [D, F] registers and
are written once, instead of an [E, D, F] cotangent per block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _walk_rows(start, count, block: int, granule: int, carry, visit_rest, visit_full, skip_rest=lambda c: c):
    """Walks [start, start + count) in blocks: first the rows past the last full block, in one block
    rounded up to a multiple of `granule` (carry = visit_rest(carry, row0, size, valid_rows), with
    `size` static and `valid_rows` dynamic; skip_rest(carry) when there are none), then the full
    blocks (carry = visit_full(carry, row0)). The rest comes first so that the backward's weight
    gradients can start from its dots instead of from zeros: most experts have no full block at
    large E.
    """
    full = count // block
    offset, rest = start + full * block, count - full * block
    sizes = range(granule, block + 1, granule)
    branches = [skip_rest] + [lambda c, s=size: visit_rest(c, offset, s, rest) for size in sizes]
    carry = jax.lax.switch((rest + granule - 1) // granule, branches, carry)
    return jax.lax.fori_loop(0, full, lambda i, c: visit_full(c, start + i * block), carry)


def default_granule(block: int, rows: int = 0, experts: int = 1) -> int:
    """The remainder's rounding: at most 16 sizes to compile (a `lax.switch` branch each, in the forward and
    the backward), fewer than 8 rows in vain per expert for blocks of up to 128 rows (fewer than 16 for the
    default 256); coarser where an expert's expected share of the `rows` is large, so that the rounding
    wastes at most 1/32 of it: the demo MoE (2,048 rows per expert, 256-row blocks) compiles 4 sizes,
    its train step in 9.6 s against 12.0 s with 16, at the same step time (README, "Benchmark")."""
    granule = max(min(8, block), block // 16, min(block // 4, rows // (32 * max(experts, 1))))
    while block % granule:
        granule -= 1
    return granule


def _starts(counts):
    return jnp.cumsum(counts) - counts


def grouped_ffn(x, counts, w_gate, w_up, w_down, block: int = 128, granule: int | None = None):
    """x [R, D] rows sorted by expert, counts [E] rows per expert -> SwiGLU_e(row) [R, D].

    Rows past sum(counts) come out as zero when their inputs are zero (padding). `granule` must
    divide `block` (default: :func:`default_granule` of these rows and experts).
    """
    granule = default_granule(block, x.shape[0], counts.shape[0]) if granule is None else granule
    if not 1 <= granule <= block or block % granule:
        raise ValueError(f"granule {granule} must divide block {block}")
    return _grouped_ffn(x, counts, w_gate, w_up, w_down, block, granule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_ffn(x, counts, w_gate, w_up, w_down, block, granule):
    return _forward(x, counts, w_gate, w_up, w_down, block, granule)[0]


def _forward(x, counts, w_gate, w_up, w_down, block, granule):
    rows, d = x.shape
    f = w_gate.shape[-1]
    xp = jnp.concatenate([x, jnp.zeros((block, d), x.dtype)])  # blocks never run past the end
    starts = _starts(counts)

    def expert(carry, xs):
        start, count, wg, wu, wd = xs

        def visit(carry, row0, size, _=None):
            y, g_all, u_all = carry
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            g, u = xb @ wg, xb @ wu
            y = jax.lax.dynamic_update_slice_in_dim(y, (jax.nn.silu(g) * u) @ wd, row0, 0)
            g_all = jax.lax.dynamic_update_slice_in_dim(g_all, g, row0, 0)
            u_all = jax.lax.dynamic_update_slice_in_dim(u_all, u, row0, 0)
            return y, g_all, u_all

        return _walk_rows(start, count, block, granule, carry, visit, lambda c, row0: visit(c, row0, block)), None

    zeros = (jnp.zeros((rows + block, d), x.dtype), jnp.zeros((rows + block, f), x.dtype),
             jnp.zeros((rows + block, f), x.dtype))
    (y, g_all, u_all), _ = jax.lax.scan(expert, zeros, (starts, counts, w_gate, w_up, w_down))
    return y[:rows], (xp, counts, w_gate, w_up, w_down, g_all, u_all)


def _backward(block, granule, residuals, dy):
    xp, counts, w_gate, w_up, w_down, g_all, u_all = residuals
    rows = dy.shape[0]
    dyp = jnp.concatenate([dy, jnp.zeros((block, dy.shape[1]), dy.dtype)])
    starts = _starts(counts)

    def expert(dx, xs):
        start, count, wg, wu, wd = xs

        def block_grads(row0, size, valid):
            """A block's input gradient rows and its contributions to the three weight gradients."""
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            g = jax.lax.dynamic_slice_in_dim(g_all, row0, size)
            u = jax.lax.dynamic_slice_in_dim(u_all, row0, size)
            mine = (jnp.arange(size) < valid)[:, None]  # rows of the next experts in a rounded-up block
            dyb = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dyp, row0, size), 0)
            sig = jax.nn.sigmoid(g)
            dh = dyb @ wd.T
            dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
            return dg @ wg.T + du @ wu.T, (xb.T @ dg, xb.T @ du, (g * sig * u).T @ dyb)

        def visit_rest(dx, row0, size, valid):
            dx_block, dw = block_grads(row0, size, valid)
            return jax.lax.dynamic_update_slice_in_dim(dx, dx_block, row0, 0), dw

        def visit_full(carry, row0):
            dx, dw = carry
            dx_block, dw_block = block_grads(row0, block, block)
            dw = tuple(a + b for a, b in zip(dw, dw_block))
            return jax.lax.dynamic_update_slice_in_dim(dx, dx_block, row0, 0), dw

        def skip_rest(dx):
            return dx, (jnp.zeros_like(wg), jnp.zeros_like(wu), jnp.zeros_like(wd))

        return _walk_rows(start, count, block, granule, dx, visit_rest, visit_full, skip_rest)

    dx, (dwg, dwu, dwd) = jax.lax.scan(expert, jnp.zeros_like(xp), (starts, counts, w_gate, w_up, w_down))
    return dx[:rows], None, dwg, dwu, dwd


_grouped_ffn.defvjp(_forward, _backward)

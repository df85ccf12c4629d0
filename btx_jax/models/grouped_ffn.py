"""A grouped SwiGLU FFN over rows sorted by expert: the expert compute of dropless (and alltoall) on CPU.

`jax.lax.ragged_dot` lowers natively only on TPU/GPU; on CPU it is masked-dense, so every
expert multiplies every row and the cost grows with E. Here a loop over experts takes each
expert's weights once and walks its rows in blocks: as many full blocks of `block` rows as
fit, then the remainder in one block rounded up to a multiple of `granule` rows (a
`lax.switch` over the block/granule possible sizes), so each expert costs at most one block
call beyond its full blocks and computes fewer than `granule` rows in vain. Every block call
re-reads the expert's weights and adds to its [D, F] weight gradients, so the number of calls,
not the rows, is what grows with E (README: "MoE layer").

Experts are visited in order, so the last, partial block of expert e may spill into rows of
the experts after it: those rows are rewritten when their own expert is processed (and masked
out of e's weight gradients). The backward pass is written by hand: weight gradients
accumulate per expert in [D, F] registers and are written once, instead of an [E, D, F]
cotangent per block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _walk_rows(start, count, block: int, granule: int, visit, carry):
    """Calls carry = visit(carry, row0, size, valid_rows) over [start, start + count) in blocks.

    `size` is static; `valid_rows` (dynamic) is < size only for the final, rounded-up block.
    """
    full = count // block

    def full_block(i, carry):
        return visit(carry, start + i * block, block, block)

    carry = jax.lax.fori_loop(0, full, full_block, carry)
    offset, rest = start + full * block, count - full * block
    branches = [lambda c: c] + [lambda c, s=size: visit(c, offset, s, rest) for size in range(granule, block + 1, granule)]
    return jax.lax.switch((rest + granule - 1) // granule, branches, carry)


def default_granule(block: int) -> int:
    """Remainder rounding: at most 16 remainder sizes (compile time), at most 8 rows in vain below 128-row blocks."""
    granule = max(min(8, block), block // 16)
    while block % granule:
        granule -= 1
    return granule


def _starts(counts):
    return jnp.cumsum(counts) - counts


def grouped_ffn(x, counts, w_gate, w_up, w_down, block: int = 128, granule: int | None = None):
    """x [R, D] rows sorted by expert, counts [E] rows per expert -> SwiGLU_e(row) [R, D].

    Rows past sum(counts) come out as zero when their inputs are zero (padding). `granule` must
    divide `block` (default: :func:`default_granule`).
    """
    granule = default_granule(block) if granule is None else granule
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

        def visit(carry, row0, size, _):
            y, g_all, u_all = carry
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            g, u = xb @ wg, xb @ wu
            y = jax.lax.dynamic_update_slice_in_dim(y, (jax.nn.silu(g) * u) @ wd, row0, 0)
            g_all = jax.lax.dynamic_update_slice_in_dim(g_all, g, row0, 0)
            u_all = jax.lax.dynamic_update_slice_in_dim(u_all, u, row0, 0)
            return y, g_all, u_all

        return _walk_rows(start, count, block, granule, visit, carry), None

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

        def visit(carry, row0, size, valid):
            dx, dwg, dwu, dwd = carry
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            g = jax.lax.dynamic_slice_in_dim(g_all, row0, size)
            u = jax.lax.dynamic_slice_in_dim(u_all, row0, size)
            mine = (jnp.arange(size) < valid)[:, None]  # rows of the next expert in a partial block
            dyb = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dyp, row0, size), 0)
            sig = jax.nn.sigmoid(g)
            dh = dyb @ wd.T
            dwd = dwd + (g * sig * u).T @ dyb
            dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
            dwg, dwu = dwg + xb.T @ dg, dwu + xb.T @ du
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dg @ wg.T + du @ wu.T, row0, 0)
            return dx, dwg, dwu, dwd

        dx, dwg, dwu, dwd = _walk_rows(start, count, block, granule, visit,
                                       (dx, jnp.zeros_like(wg), jnp.zeros_like(wu), jnp.zeros_like(wd)))
        return dx, (dwg, dwu, dwd)

    dx, (dwg, dwu, dwd) = jax.lax.scan(expert, jnp.zeros_like(xp), (starts, counts, w_gate, w_up, w_down))
    return dx[:rows], None, dwg, dwu, dwd


_grouped_ffn.defvjp(_forward, _backward)

"""A grouped SwiGLU FFN over rows sorted by expert: the expert compute of dropless (and alltoall) on CPU.

`jax.lax.ragged_dot` lowers natively only on TPU/GPU; on CPU it is masked-dense, so every
expert multiplies every row and the cost grows with E. Here the work is split in two:

- **The batched part.** The first `capacity` rows of every expert are gathered into an
  [E, capacity, D] buffer (slots past an expert's rows are zero) and run as three batched
  matmuls, as a capacity-based layer would. A batched matmul costs about what a dense one of the
  same FLOPs costs, whatever E (README, "Benchmark"), so this part is flat in E; the default
  capacity is an expert's expected share of the rows plus one standard deviation of a random
  routing's count, so the zero slots cost little and few experts overflow.
- **The overflow.** Rows past `capacity` (experts well above their expected share) are walked by a loop
  over only those experts, in blocks: one block rounded up to a multiple of `granule` rows (a
  `lax.switch` over the block/granule possible sizes), then as many full blocks of `block` rows
  as fit. Each visited expert's weights are copied out of the stacked [E, D, F] arrays and its
  gradients added back: a fixed cost per expert, which is why this part is kept to the experts
  that need it. Nothing is dropped: a skewed routing costs more loop steps and leaves slots of the
  batched part empty (at worst, every row in one expert, about twice the FLOPs of the rows), never
  wrong rows.

Experts are visited in order, so an expert's rounded-up block may spill into rows of the experts
after it: those rows are taken from the batched part or rewritten when their own expert is
visited (and masked out of this expert's weight gradients). The backward pass is written by
hand: the batched part's gradients are batched matmuls; the overflow recomputes its gate and up
activations (few rows) instead of keeping [R, F] buffers of them.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The batched part's rows per expert: the expert's expected share of the rows plus this many standard
# deviations of a uniformly random routing's count (sqrt of the share). Each expert above its capacity
# costs a loop visit, which copies its weights; each slot of slack costs one row's FLOPs for every
# expert. At 0 about half the experts visit the loop; at 1 about one in six, for a slack of
# 1 / sqrt(share) before rounding up to the granule (of the bench's 4,096 rows: 3% at E = 4, 6% at E = 8
# and 16, 12.5% at E = 32) (README, "Benchmark").
CAPACITY_STDS = 1.0


def _walk_rows(start, count, block: int, granule: int, carry, visit_rest, visit_full, skip_rest=lambda c: c):
    """Walks [start, start + count) in blocks: first the rows past the last full block, in one block
    rounded up to a multiple of `granule` (carry = visit_rest(carry, row0, size, valid_rows), with
    `size` static and `valid_rows` dynamic; skip_rest(carry) when there are none), then the full
    blocks (carry = visit_full(carry, row0)). The rest comes first so that the backward's weight
    gradients can start from its dots instead of from zeros.
    """
    full = count // block
    offset, rest = start + full * block, count - full * block
    sizes = range(granule, block + 1, granule)
    branches = [skip_rest] + [lambda c, s=size: visit_rest(c, offset, s, rest) for size in sizes]
    carry = jax.lax.switch((rest + granule - 1) // granule, branches, carry)
    return jax.lax.fori_loop(0, full, lambda i, c: visit_full(c, start + i * block), carry)


def default_granule(block: int, rows: int = 0, experts: int = 1) -> int:
    """The overflow's rounding: at most 16 sizes to compile (a `lax.switch` branch each, in the forward and
    the backward), fewer than 8 rows in vain per expert for blocks of up to 128 rows (fewer than 16 for the
    default 256); coarser where an expert's expected share of the `rows` is large, so that the rounding
    wastes at most 1/32 of it: the demo MoE (2,048 rows per expert, 256-row blocks) compiles 4 sizes."""
    granule = max(min(8, block), block // 16, min(block // 4, rows // (32 * max(experts, 1))))
    while block % granule:
        granule -= 1
    return granule


def default_capacity(expected_rows: float, granule: int = 8) -> int:
    """The batched part's rows per expert: `expected_rows` (an expert's mean share of the rows) plus
    CAPACITY_STDS x sqrt(expected_rows), rounded up to a multiple of `granule`."""
    rows = expected_rows + CAPACITY_STDS * math.sqrt(expected_rows)
    return max(granule, math.ceil(rows / granule) * granule)


def grouped_ffn(x, counts, w_gate, w_up, w_down, block: int = 128, granule: int | None = None,
                capacity: int | None = None):
    """x [R, D] rows sorted by expert, counts [E] rows per expert -> SwiGLU_e(row) [R, D].

    Rows past sum(counts) are padding and come out as zero. `granule` must divide `block` (default:
    :func:`default_granule` of these rows and experts); `capacity` is the batched part's rows per
    expert (default: :func:`default_capacity` of R / E, every row counted as real).
    """
    rows, experts = x.shape[0], counts.shape[0]
    granule = default_granule(block, rows, experts) if granule is None else granule
    if not 1 <= granule <= block or block % granule:
        raise ValueError(f"granule {granule} must divide block {block}")
    capacity = default_capacity(rows / experts, granule) if capacity is None else capacity
    if capacity < 1:
        raise ValueError(f"capacity {capacity} must be at least 1 row per expert")
    return _grouped_ffn(x, counts, w_gate, w_up, w_down, block, granule, capacity)


class _Layout(NamedTuple):
    """Where each row goes. Slots of the batched part are numbered expert * capacity + position."""
    starts: jax.Array  # [E] first row of each expert
    slot_row: jax.Array  # [E * capacity] the row in each slot; R (a zero row) for an empty slot
    row_slot: jax.Array  # [R] each row's slot; E * capacity (a zero slot) for overflow and padding rows
    overflow_row: jax.Array  # [R] bool: a row past its expert's capacity
    overflow_experts: jax.Array  # [E] the experts with overflow rows first, in expert order
    num_overflow: jax.Array  # how many experts have overflow rows


def _layout(counts, rows: int, capacity: int) -> _Layout:
    experts = counts.shape[0]
    ends = jnp.cumsum(counts)
    starts = ends - counts
    position = jnp.arange(capacity)[None, :]
    slot_row = jnp.where(position < counts[:, None], starts[:, None] + position, rows).reshape(-1)
    row = jnp.arange(rows)
    expert = jnp.searchsorted(ends, row, side="right")  # E for padding rows
    local = row - starts[jnp.minimum(expert, experts - 1)]
    real = expert < experts
    row_slot = jnp.where(real & (local < capacity), expert * capacity + local, experts * capacity)
    overflows = counts > capacity
    return _Layout(starts, slot_row, row_slot, real & (local >= capacity),
                   jnp.argsort(~overflows, stable=True), jnp.sum(overflows))


def _take_rows(a, index):
    """a[index] along the rows, where index == len(a) picks a zero row (a gather that fills, not a padded copy)."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


def _combine(layout: _Layout, batched, overflow):
    """Each row from the batched part or the overflow; padding rows zero."""
    rows = layout.row_slot.shape[0]
    return jnp.where(layout.overflow_row[:, None], overflow[:rows], _take_rows(batched, layout.row_slot))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _grouped_ffn(x, counts, w_gate, w_up, w_down, block, granule, capacity):
    return _forward(x, counts, w_gate, w_up, w_down, block, granule, capacity)[0]


def _forward(x, counts, w_gate, w_up, w_down, block, granule, capacity):
    rows, d = x.shape
    experts = counts.shape[0]
    layout = _layout(counts, rows, capacity)
    xe = _take_rows(x, layout.slot_row).reshape(experts, capacity, d)
    g, u = jnp.einsum("ecd,edf->ecf", xe, w_gate), jnp.einsum("ecd,edf->ecf", xe, w_up)
    ye = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w_down).reshape(-1, d)

    xp = jnp.concatenate([x, jnp.zeros((block, d), x.dtype)])  # blocks never run past the end

    def expert(i, y):
        e = layout.overflow_experts[i]
        wg, wu, wd = w_gate[e], w_up[e], w_down[e]

        def visit(y, row0, size, _=None):
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            return jax.lax.dynamic_update_slice_in_dim(y, (jax.nn.silu(xb @ wg) * (xb @ wu)) @ wd, row0, 0)

        return _walk_rows(layout.starts[e] + capacity, counts[e] - capacity, block, granule, y, visit,
                          lambda y, row0: visit(y, row0, block))

    y_overflow = jax.lax.fori_loop(0, layout.num_overflow, expert, jnp.zeros_like(xp))
    return _combine(layout, ye, y_overflow), (x, counts, w_gate, w_up, w_down, xe, g, u)


def _backward(block, granule, capacity, residuals, dy):
    x, counts, w_gate, w_up, w_down, xe, g, u = residuals
    rows, d = x.shape
    layout = _layout(counts, rows, capacity)

    def swiglu_grads(dy, g, u, w_down):
        """Gradients of y = (silu(g) * u) @ w_down w.r.t. g and u, and the hidden activation."""
        sig = jax.nn.sigmoid(g)
        dh = dy @ jnp.swapaxes(w_down, -1, -2)
        return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig, g * sig * u

    dye = _take_rows(dy, layout.slot_row).reshape(xe.shape)
    dg, du, h = swiglu_grads(dye, g, u, w_down)
    dxe = (jnp.einsum("ecf,edf->ecd", dg, w_gate) + jnp.einsum("ecf,edf->ecd", du, w_up)).reshape(-1, d)
    dw = (jnp.einsum("ecd,ecf->edf", xe, dg), jnp.einsum("ecd,ecf->edf", xe, du), jnp.einsum("ecf,ecd->efd", h, dye))

    xp = jnp.concatenate([x, jnp.zeros((block, d), x.dtype)])
    dyp = jnp.concatenate([dy, jnp.zeros((block, d), dy.dtype)])

    def expert(i, carry):
        dx, dw = carry
        e = layout.overflow_experts[i]
        wg, wu, wd = w_gate[e], w_up[e], w_down[e]

        def block_grads(row0, size, valid):
            """A block's input gradient rows and its contributions to the three weight gradients."""
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, size)
            mine = (jnp.arange(size) < valid)[:, None]  # rows of the next experts in a rounded-up block
            dyb = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dyp, row0, size), 0)
            dgb, dub, hb = swiglu_grads(dyb, xb @ wg, xb @ wu, wd)
            return dgb @ wg.T + dub @ wu.T, (xb.T @ dgb, xb.T @ dub, hb.T @ dyb)

        def visit_rest(dx, row0, size, valid):
            dx_block, dw_expert = block_grads(row0, size, valid)
            return jax.lax.dynamic_update_slice_in_dim(dx, dx_block, row0, 0), dw_expert

        def visit_full(carry, row0):
            dx, dw_expert = carry
            dx_block, dw_block = block_grads(row0, block, block)
            return (jax.lax.dynamic_update_slice_in_dim(dx, dx_block, row0, 0),
                    tuple(a + b for a, b in zip(dw_expert, dw_block)))

        def skip_rest(dx):
            return dx, (jnp.zeros_like(wg), jnp.zeros_like(wu), jnp.zeros_like(wd))

        dx, dw_expert = _walk_rows(layout.starts[e] + capacity, counts[e] - capacity, block, granule, dx,
                                   visit_rest, visit_full, skip_rest)
        return dx, tuple(a.at[e].add(b) for a, b in zip(dw, dw_expert))

    dx_overflow, (dwg, dwu, dwd) = jax.lax.fori_loop(0, layout.num_overflow, expert, (jnp.zeros_like(xp), dw))
    return _combine(layout, dxe, dx_overflow), None, dwg, dwu, dwd


_grouped_ffn.defvjp(_forward, _backward)

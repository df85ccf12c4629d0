"""Cutting each target leaf into tiles, the unit the surgeon reads, merges and writes.

A tile is a box of whole source chunks (a source chunk is what the checkpoint stores and
decompresses as one piece: the shard each device held when it was saved, or the whole leaf
when it was saved from one device), grown from the last axis while its working memory fits the
budget. In the target it is one box of every expert slot it fills (``stack``) or of the merged
leaf; all tiles of a leaf have one shape, which is also the zarr shard shape the leaf is written
with, so each tile is written as one piece, without reading anything back.

Tiles are numbered in a fixed order and given to processes so that each process gets about the
same bytes; the grid depends on the sources and the budget only, never on the number of processes,
so one process and many write the same values.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from btx_jax.mix.plan import LeafPlan, grouped

BFLOAT16 = np.dtype("bfloat16")


@dataclasses.dataclass(frozen=True)
class Tile:
    """One box of one target leaf and what making it holds in memory."""

    plan: LeafPlan
    leaf: int  # the plan's position (seeds the copy noise)
    index: int  # position in the leaf's tile grid, in C order (seeds the copy noise)
    box: tuple[slice, ...]  # in the dense source leaf's index space (all k layers of a group when moe_every = k)
    label: str | None  # stack: the FFN source this tile copies; None: every source of the plan
    experts: tuple[int, ...]  # stack: the expert slots it fills (copies of one source); () otherwise
    work: int  # bytes held at most while the tile is in flight (reads, accumulator, output)
    nbytes: int  # bytes written
    read_bytes: int  # bytes read from the sources


def element_work(plan: LeafPlan, source_dtypes: list[str], noisy_copies: bool) -> int:
    """Bytes per element a tile of this plan holds at its peak (per expert slot for stack).

    A read holds the compressed chunk next to the decoded one (2 x the source itemsize s); a write
    holds the output next to its encoded copy (2 x the target itemsize t, or t more when the output
    is the source array itself); merges of several sources hold a float32 accumulator; noisy copies
    a float32 value and its noise. Other float math runs in blocks and is not counted."""
    s = max(np.dtype(d).itemsize for d in source_dtypes) if source_dtypes else 0
    t = np.dtype(plan.dtype).itemsize
    cast = any(np.dtype(d) != np.dtype(plan.dtype) for d in source_dtypes)
    if plan.kind == "router":
        return 4 + 2 * t
    if plan.kind == "stack":  # the source box stays while its copies are written
        return max(2 * s, s + (2 * t if cast else t), (s + max(8, 4 + t, 2 * t)) if noisy_copies else 0)
    if len(plan.sources) == 1:
        return max(2 * s, s + t, 2 * t)
    return max(4 + 2 * s, 4 + t, 2 * t)


def tile_shape(shape: tuple[int, ...], chunk: tuple[int, ...], work_per_element: int, budget: int,
               row_multiple: int = 1) -> tuple[int, ...]:
    """The block of whole chunks (clipped to `shape`), grown from the last axis, whose work fits
    `budget`; at least one chunk (and `row_multiple` rows: whole groups of moe_every layers)."""
    block = [min(c, n) for c, n in zip(chunk, shape)]
    if block:
        block[0] = min(math.lcm(block[0], row_multiple), shape[0])
    steps = list(block)
    for axis in reversed(range(len(shape))):
        others = math.prod(block[:axis] + block[axis + 1:]) * work_per_element
        fit = budget // max(others, 1) // steps[axis] * steps[axis]
        block[axis] = min(max(fit, block[axis]), shape[axis])
        if block[axis] < shape[axis]:
            break
    return tuple(block)


def boxes(shape: tuple[int, ...], block: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The grid of `block`-sized boxes covering `shape`, in C order (edge boxes clipped)."""
    grid = [range(0, n, b) for n, b in zip(shape, block)]
    starts = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape)) if shape else np.zeros((1, 0), int)
    return [tuple(slice(int(a), min(int(a) + b, n)) for a, b, n in zip(row, block, shape)) for row in starts]


def target_index(plan: LeafPlan, box: tuple[slice, ...], every: int, expert: int | None = None) -> tuple[slice, ...]:
    """Where a source-space box lands in the target leaf (one expert slot for stack)."""
    if not box:
        return ()
    rows, rest = box[0], box[1:]
    if grouped(plan.target, every):
        rows = slice(rows.start // every, rows.stop // every)
        if plan.target.startswith("dense_layers/"):
            rest = (slice(0, every - 1), *rest)
    if plan.kind == "stack":
        return (rows, slice(expert, expert + 1), *rest)
    return (rows, *rest)


def write_shape(plan: LeafPlan, block: tuple[int, ...], every: int) -> tuple[int, ...]:
    """The target shard shape of a full tile."""
    if plan.kind == "router":
        return plan.shape
    full = tuple(slice(0, b) for b in block)
    index = target_index(plan, full, every, expert=0)
    return tuple(s.stop - s.start for s in index)


def leaf_tiles(leaf: int, plan: LeafPlan, source_shape: tuple[int, ...], chunk: tuple[int, ...],
               source_dtypes: list[str], every: int, budget: int, noisy_copies: bool) -> tuple[list[Tile], tuple]:
    """The tiles of one target leaf and its write (shard) shape."""
    if plan.kind == "router":
        work = int(np.prod(plan.shape)) * element_work(plan, [], False)
        return [Tile(plan, leaf, 0, (), None, (), work, plan.nbytes, 0)], plan.shape
    k = every if grouped(plan.target, every) else 1
    per_element = element_work(plan, source_dtypes, noisy_copies)
    # A tile's work counts the elements it writes per slot; for the MoE layers of a regrouped leaf
    # that is 1/k of the source rows in the box.
    rows_scale = k if plan.target.startswith("layers/") and k > 1 else 1
    block = tile_shape(source_shape, chunk, max(per_element // rows_scale, 1), budget, k)
    target_item = np.dtype(plan.dtype).itemsize
    source_item = max(np.dtype(d).itemsize for d in source_dtypes)
    tiles = []
    labels = list(dict.fromkeys(plan.sources)) if plan.kind == "stack" else [None]
    for label in labels:
        slots = tuple(i for i, s in enumerate(plan.sources) if s == label) if label else ()
        for index, box in enumerate(boxes(source_shape, block)):
            sizes = [s.stop - s.start for s in target_index(plan, box, every, expert=0)]
            elements = math.prod(sizes)  # per expert slot: the stack target's expert axis has size 1
            reads = 1 if label else len(plan.sources)
            tiles.append(Tile(plan, leaf, index, box, label, slots, elements * per_element,
                              elements * target_item * max(len(slots), 1), elements * source_item * reads))
    return tiles, write_shape(plan, block, every)


def assign(tiles: list[Tile], processes: int) -> list[int]:
    """The process that makes each tile: in order, to the one with the fewest bytes so far."""
    load, owners = [0] * processes, []
    for tile in tiles:
        owner = min(range(processes), key=lambda p: (load[p], p))
        load[owner] += tile.nbytes + tile.read_bytes
        owners.append(owner)
    return owners

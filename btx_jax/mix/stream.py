"""Reading, merging and writing the merged checkpoint tile by tile (the grid: tiles.py; a tile's
float arithmetic: tile_math.py).

The output is one Orbax save (``checkpoint.ParamWriter.write_all``) whose leaves are
``StreamedLeaf`` placeholders. Their type handler (``TileWriter``) opens each leaf's array with the
tensorstore spec Orbax itself writes arrays with (OCDBT, zarr v3, this process's
``ocdbt.process_<i>`` database; the zarr shard shape = the tile shape) and writes this process's
tiles into it, each as it is made. Orbax writes the tree metadata, merges the processes' OCDBT
databases and commits the directory, so the result restores with the standard handlers
(``checkpoint.load_params``, ``read_param``) like any other checkpoint.

Memory: tiles run concurrently while the sum of their ``work`` stays under the budget (a tile
that alone exceeds it runs alone), so host memory is the budget, whatever the number of experts
or layers. Sources are read a tile at a time through tensorstore (only the chunks a tile covers).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import psutil
import tensorstore as ts

from btx_jax import checkpoint
from btx_jax.mix.plan import LeafPlan, MixError, Source, grouped, inner_axis
from btx_jax.mix import router_init
from btx_jax.mix.tile_math import accumulate, all_finite, from_float32, row_moments, scaled, with_drop, with_noise
from btx_jax.mix.tiles import Tile, assign, leaf_tiles, target_index

# ---------------------------------------------------------------------------- granular experts
# mix.granularity = g: expert e of a stack leaf is part j = e % g of its source's F axis, [j F/g, (j+1) F/g).
# The tile grid is cut inside one part ([0, F/g) with an F block dividing F/g) and repeated for every part,
# each tile filling the slots of its part; the down kernels are scaled by g and the router columns of a
# copy's g experts are equal: with renormalized top-(g k) gates a token then takes whole copies, each
# part with 1/g of the copy's gate, and the MoE equals the dense model.

def granular_tiles(tiles: list[Tile], plan: LeafPlan) -> list[Tile]:
    """The tiles of part 0 (boxes inside [0, F/g)) -> those of every part, each with its part's slots."""
    g, axis = plan.granularity, inner_axis(plan.target)
    width = plan.shape[axis + 1]  # the target's F/g (its axes: layers, experts, then the source's)
    out = []
    for j in range(g):
        for tile in tiles:
            box = list(tile.box)
            box[axis] = slice(box[axis].start + j * width, box[axis].stop + j * width)
            slots = tuple(e for e in tile.experts if e % g == j)
            share = len(slots) / max(len(tile.experts), 1)
            out.append(dataclasses.replace(tile, box=tuple(box), experts=slots, index=j * len(tiles) + tile.index,
                                           nbytes=int(tile.nbytes * share)))
    return out


def stack_index(plan: LeafPlan, box: tuple[slice, ...], every: int, expert: int) -> tuple[slice, ...]:
    """target_index of a stack tile's slot, the F axis moved into the expert's part."""
    index = list(target_index(plan, box, every, expert))
    if plan.granularity > 1:
        axis = inner_axis(plan.target) + 1  # in the target: layers, experts, then the source's axes
        shift = (expert % plan.granularity) * plan.shape[axis]
        index[axis] = slice(index[axis].start - shift, index[axis].stop - shift)
    return tuple(index)


# ------------------------------------------------------------------------------------- sources

class Sources:
    """Each source's leaves as open tensorstores (or a Hugging Face reader), read a box at a time."""

    def __init__(self, by_label: dict[str, Source]):
        self.by_label, self._open = by_label, {}

    def store(self, label: str, path: str):
        key = (label, path)
        if key not in self._open:
            source = self.by_label[label]
            self._open[key] = None if source.read else checkpoint.open_param(source.path, path)
        return self._open[key]

    def chunk(self, label: str, path: str) -> tuple[int, ...]:
        store = self.store(label, path)
        shape = self.by_label[label].params[path][0]
        return tuple(shape) if store is None else tuple(store.chunk_layout.read_chunk.shape)

    async def read(self, label: str, plan: LeafPlan, box: tuple[slice, ...], every: int) -> np.ndarray:
        """The box of `label`'s source leaf, laid out as the target wants it (layers regrouped)."""
        source, path = self.by_label[label], plan.source_path
        index = box
        strided = grouped(plan.target, every) and plan.target.startswith("layers/")
        if strided:  # only the MoE layers of each group of `every`
            index = (slice(box[0].start + every - 1, box[0].stop, every), *box[1:])
        if source.read:
            array = await asyncio.to_thread(lambda: np.ascontiguousarray(source.read(path)[index]))
        else:
            array = await self.store(label, path)[index].read()
        if grouped(plan.target, every) and not strided:
            array = array.reshape(array.shape[0] // every, every, *array.shape[1:])[:, :every - 1]
        if not await asyncio.to_thread(all_finite, array):
            raise MixError(f"{label} ({source.path}) has NaN or Inf in {path}\n"
                           "  fix: use an earlier checkpoint of that run; no merged checkpoint was written")
        return array

    def read_whole(self, label: str, path: str) -> np.ndarray:
        source = self.by_label[label]
        return source.read(path) if source.read else self.store(label, path).read().result()


# -------------------------------------------------------------------------------------- tiles

def drops(tile: Tile, mix) -> bool:
    """Whether the tile's slots are Drop-Upcycling copies (mix.upcycle=drop, a source filling > 1 slot)."""
    return tile.plan.kind == "stack" and mix.get("upcycle", "copy") == "drop" and len(tile.experts) > 1


async def make_tile(tile: Tile, sources: Sources, mix, every: int, stats: dict | None = None):
    """Yields (target index, value) pairs of one tile, in order; the caller writes each before the next.
    `stats`: {(leaf, label): (mean, std) per target layer}, for Drop-Upcycling tiles."""
    plan = tile.plan
    if plan.kind == "router":
        g = mix.get("granularity", 1)
        if g == 1:
            yield (), router_init.initial_router(plan, mix, np.random.default_rng([mix.noise_seed, tile.leaf]))
            return
        copies = dataclasses.replace(plan, shape=(*plan.shape[:-1], plan.shape[-1] // g))  # one column a copy
        router = router_init.initial_router(copies, mix, np.random.default_rng([mix.noise_seed, tile.leaf]))
        yield (), np.repeat(router, g, axis=-1)  # a copy's g experts: equal columns, adjacent
        return
    if plan.kind == "stack":
        x = await sources.read(tile.label, plan, tile.box, every)
        if plan.granularity > 1 and inner_axis(plan.target) == 1:  # down: each part carries 1/g of the gate
            x = await asyncio.to_thread(scaled, x, plan.granularity, plan.dtype)
        for n, expert in enumerate(tile.experts):
            index = stack_index(plan, tile.box, every, expert)
            if drops(tile, mix):
                value = await asyncio.to_thread(with_drop, x, plan, tile.box, every, expert, mix,
                                                stats[tile.leaf, tile.label])
            elif n and mix.copy_noise > 0:
                rng = np.random.default_rng([mix.noise_seed, tile.leaf, expert, tile.index])
                value = await asyncio.to_thread(with_noise, x, mix.copy_noise, rng, plan.dtype)
            else:
                value = x if x.dtype == np.dtype(plan.dtype) else await asyncio.to_thread(x.astype, plan.dtype)
            yield index, np.expand_dims(value, 1)
            del value
        return
    index = target_index(plan, tile.box, every)
    if len(plan.sources) == 1:
        x = await sources.read(plan.sources[0], plan, tile.box, every)
        if x.dtype != np.dtype(plan.dtype):
            x = await asyncio.to_thread(x.astype, plan.dtype)
        yield index, x
        return
    total = None
    for label, weight in zip(plan.sources, plan.weights):
        x = await sources.read(label, plan, tile.box, every)
        total = await asyncio.to_thread(accumulate, total, x, weight)
        del x
    value = await asyncio.to_thread(from_float32, total, plan.dtype)
    del total
    yield index, value


@contextlib.contextmanager
def compact_heap():
    """Yields a function that hands freed memory back to the system; Python's cyclic GC is off meanwhile.

    glibc keeps what a thread frees in that thread's arena for reuse, and tensorstore's and the
    merge's threads each get one: RSS then grows to several budgets' worth of freed tiles. For the
    duration, threads share at most two arenas, and each finished tile trims them. (The GC found
    nothing to collect but took a few % of the time: the stream allocates many small objects.)"""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        mallopt = trim = None
    m_arena_max = -8
    if mallopt:
        mallopt(m_arena_max, 2)
    try:
        yield (lambda: trim(0)) if trim else (lambda: None)
    finally:
        if mallopt:
            mallopt(m_arena_max, 0)  # back to glibc's default
        if gc_was_enabled:
            gc.enable()


class _Budget:
    """Bytes in flight: `acquire` waits until `n` more fit under the limit; a request larger than
    the limit goes through when nothing else is in flight (one big tile still runs, alone)."""

    def __init__(self, limit: int):
        self.limit, self.used, self._changed = limit, 0, asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


@dataclasses.dataclass
class StreamedLeaf:
    """A leaf of the save tree that the TileWriter writes tile by tile."""

    target: str
    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...]


class Stream:
    """Every tile of every target leaf, this process's share of them, and how they are made."""

    MAX_IN_FLIGHT = 8

    def __init__(self, plans: list[LeafPlan], sources: Sources, mix, every: int, budget: int, progress=None):
        self.sources, self.mix, self.every, self.budget = sources, mix, every, budget
        self.progress = progress or (lambda n: None)
        self.trim = lambda: None  # set by the caller: see compact_heap
        self.rss_at_start = 0  # this process's resident memory when its first tile starts
        noisy = (mix.copy_noise > 0 or mix.get("upcycle", "copy") == "drop") and any(
            len(set(p.sources)) < len(p.sources) for p in plans if p.kind == "stack")
        self.tiles, self.leaves = [], {}
        for leaf, plan in enumerate(plans):
            if plan.kind == "router":
                shape, chunk, dtypes = plan.shape, plan.shape, []
            else:
                labels = list(dict.fromkeys(plan.sources))
                shape = sources.by_label[labels[0]].params[plan.source_path][0]
                chunk = tuple(np.max([sources.chunk(label, plan.source_path) for label in labels], axis=0))
                dtypes = [sources.by_label[label].params[plan.source_path][1] for label in labels]
            shape, chunk = tuple(shape), tuple(int(c) for c in chunk)
            if plan.kind == "stack" and plan.granularity > 1:  # cut inside part 0; granular_tiles repeats it
                axis = inner_axis(plan.target)
                width = shape[axis] // plan.granularity
                shape = (*shape[:axis], width, *shape[axis + 1:])
                chunk = (*chunk[:axis], math.gcd(chunk[axis], width), *chunk[axis + 1:])
            tiles, shard = leaf_tiles(leaf, plan, shape, chunk, dtypes, every, budget, noisy)
            if plan.kind == "stack" and plan.granularity > 1:
                tiles = granular_tiles(tiles, plan)
            self.tiles += tiles
            self.leaves[plan.target] = StreamedLeaf(plan.target, plan.shape, np.dtype(plan.dtype), tuple(shard))
        self.owners = assign(self.tiles, jax.process_count())
        self.mine = [t for t, owner in zip(self.tiles, self.owners) if owner == jax.process_index()]
        self.stats = {}  # Drop-Upcycling: see drop_statistics

    async def drop_statistics(self) -> None:
        """(mean, std) per target layer of each copied FFN leaf, for the layers of this process's
        Drop-Upcycling tiles: read a tile at a time before any tile is made (the whole layer's
        matrix, whatever part of it a tile holds)."""
        rows = {(t.leaf, t.label, t.box[0].start) for t in self.mine if drops(t, self.mix)}
        sums = {}
        for tile in self.tiles:
            if not drops(tile, self.mix) or (tile.leaf, tile.label, tile.box[0].start) not in rows:
                continue
            x = await self.sources.read(tile.label, tile.plan, tile.box, self.every)
            total, squares, count = await asyncio.to_thread(row_moments, x)
            del x
            layers = target_index(tile.plan, tile.box, self.every, 0)[0]
            acc = sums.setdefault((tile.leaf, tile.label), np.zeros((3, tile.plan.shape[0])))
            acc[0, layers] += total
            acc[1, layers] += squares
            acc[2, layers] += count
        for key, (total, squares, count) in sums.items():
            mean = total / np.maximum(count, 1)
            self.stats[key] = (mean, np.sqrt(np.maximum(squares / np.maximum(count, 1) - mean * mean, 0.0)))

    def tree(self) -> dict:
        tree = {}
        for leaf in self.leaves.values():
            checkpoint.nested(tree, leaf.target, leaf)
        return tree

    async def run(self, stores: dict) -> None:
        """Makes and writes this process's tiles, as many at a time as the budget allows."""
        budget, running, trim = _Budget(self.budget), set(), self.trim
        trim()
        await self.drop_statistics()
        self.rss_at_start = psutil.Process().memory_info().rss

        async def one(tile: Tile) -> None:
            try:
                async for index, value in make_tile(tile, self.sources, self.mix, self.every, self.stats):
                    await stores[tile.plan.target][index].write(value)
                    del value
                self.progress(tile.nbytes)
            finally:
                await budget.release(tile.work)
                trim()

        def reap() -> None:
            for task in [t for t in running if t.done()]:
                running.discard(task)
                task.result()  # a failed tile stops the run

        try:
            for tile in self.mine:
                while len(running) >= self.MAX_IN_FLIGHT:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    reap()
                await budget.acquire(tile.work)
                reap()
                running.add(asyncio.create_task(one(tile)))
            for task in asyncio.as_completed(running):
                await task
        except BaseException:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise


class TileWriter(ocp.type_handlers.TypeHandler):
    """Orbax type handler of StreamedLeaf: the save of the whole tree calls `serialize` once with every
    leaf; it opens the leaves' arrays and runs the stream. Restores go to the standard handlers."""

    def __init__(self, stream: Stream):
        self.stream = stream

    def typestr(self) -> str:
        return "np.ndarray"  # what the checkpoint's metadata records: a plain array

    async def metadata(self, infos):
        raise NotImplementedError("the surgeon's handler only writes; read with the standard handlers")

    async def deserialize(self, infos, args=None):
        raise NotImplementedError("the surgeon's handler only writes; read with the standard handlers")

    async def serialize(self, values, infos, args=None):
        stores = {}
        for leaf, info in zip(values, infos):
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=leaf.shape, local_shape=leaf.write_shape,
                dtype=leaf.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None)
            primary = jax.process_index() == 0  # creates the array's metadata; the others assume it
            stores[leaf.target] = await ts.open(ts.Spec(spec), create=primary, open=True,
                                                assume_metadata=not primary, context=info.ts_context)
        await self.stream.run(stores)
        return [ocp.future.NoopFuture()]  # everything is written by now


def registry(stream: Stream):
    """StreamedLeaf -> TileWriter (and jax.Array's standard handler, which Orbax expects to find)."""
    arrays = ocp.type_handlers.get_type_handler(jax.Array)
    return ocp.type_handlers.create_type_handler_registry((StreamedLeaf, TileWriter(stream)), (jax.Array, arrays))


def overwrite_leaf(checkpoint_dir, name: str, value: np.ndarray) -> None:
    """Replaces the values of one leaf of a written (not yet renamed) checkpoint, in place."""
    store = checkpoint.open_param(checkpoint_dir, name, write=True)
    store.write(value).result()

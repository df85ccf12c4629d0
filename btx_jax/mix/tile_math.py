"""The float arithmetic of one tile of the merged checkpoint (the streaming around it: stream.py).

Sources are read in their own dtype and combined in float32 a block at a time, so the
temporaries stay a few MB whatever the tile: dtype round trips (bfloat16 as raw bits), weighted
sums (averaging), finiteness checks, copy noise, and the redrawn intermediate dimensions of
sparse upcycling's ``mix.drop_ratio``, drawn from a counter-based hash so that any tile of any
process draws the same values for the same element.
"""
from __future__ import annotations

import numpy as np

from btx_jax.mix.plan import LeafPlan
from btx_jax.mix.tiles import BFLOAT16, target_index

_BLOCK = 1 << 20  # elements per step of the float math (4 MB of float32)


# ----------------------------------------------------------------------------------- float math

def to_float32(x: np.ndarray) -> np.ndarray:
    """A new float32 array (bfloat16 by a bit shift: exact, and ~10x faster than ml_dtypes' cast)."""
    if x.dtype == BFLOAT16:
        out = np.empty(x.shape, np.float32)
        bits = out.view(np.uint32)
        bits[...] = x.view(np.uint16)
        bits <<= 16
        return out
    return x.astype(np.float32)


def from_float32(x: np.ndarray, dtype) -> np.ndarray:
    """float32 -> `dtype` (bfloat16 rounded to nearest even, as ml_dtypes does, for finite values)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return x
    if dtype != BFLOAT16:
        return x.astype(dtype)
    out = np.empty(x.shape, np.uint16)
    flat_in, flat_out = x.reshape(-1).view(np.uint32), out.reshape(-1)
    for i in range(0, flat_in.size, _BLOCK):
        u = flat_in[i:i + _BLOCK]
        rounded = (u >> 16) & 1
        rounded += 0x7FFF
        rounded += u
        rounded >>= 16
        flat_out[i:i + _BLOCK] = rounded
    return out.view(BFLOAT16)


def accumulate(total: np.ndarray | None, x: np.ndarray, weight: float) -> np.ndarray:
    """total + weight * x in float32, in blocks (no full-size temporary)."""
    if total is None:
        total = to_float32(x)
        total *= np.float32(weight)
        return total
    flat_total, flat_x = total.reshape(-1), np.ascontiguousarray(x).reshape(-1)
    for i in range(0, flat_x.size, _BLOCK):
        part = to_float32(flat_x[i:i + _BLOCK])
        part *= np.float32(weight)
        flat_total[i:i + _BLOCK] += part
    return total


def all_finite(x: np.ndarray) -> bool:
    flat = np.ascontiguousarray(x).reshape(-1)
    if x.dtype == BFLOAT16:  # exponent bits all ones: inf or NaN
        return not any(((flat[i:i + _BLOCK].view(np.uint16) & 0x7F80) == 0x7F80).any()
                       for i in range(0, flat.size, _BLOCK))
    return all(np.isfinite(flat[i:i + _BLOCK]).all() for i in range(0, flat.size, _BLOCK))


def block_std(x: np.ndarray) -> float:
    """np.std(x), summed in float64 over blocks (no full-size temporary)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    total = squares = 0.0
    for i in range(0, flat.size, _BLOCK):
        block = flat[i:i + _BLOCK].astype(np.float64)
        total, squares = total + block.sum(), squares + np.dot(block, block)
    mean = total / max(flat.size, 1)
    return float(np.sqrt(max(squares / max(flat.size, 1) - mean * mean, 0.0)))


def with_noise(x: np.ndarray, scale: float, rng: np.random.Generator, dtype) -> np.ndarray:
    """x + normal(0, scale * std(x)), in `dtype`."""
    value = to_float32(x)
    noise = rng.standard_normal(value.shape, dtype=np.float32)
    noise *= np.float32(scale * block_std(value))
    value += noise
    del noise
    return from_float32(value, dtype)


# ------------------------------------------------------------------------------- drop-upcycling
# mix.upcycle=drop: in every copy of an FFN, round(drop_ratio * F) of the F intermediate dims, drawn
# per (noise_seed, layer, expert), are re-initialized in gate/up (columns of [D, F]) and down (rows of
# [F, D]) from normal(mean, std) of the original layer matrix; the rest is copied. The index set and
# the values depend on (seed, layer, expert, element) only, never on the tiling or the processes.

_DROP_TAG = 0xD809  # keeps drop's random streams apart from the router's and the copy noise's
_FFN_KIND = {"gate": 0, "up": 1, "down": 2}


def drop_indices(seed: int, layer: int, expert: int, width: int, ratio: float) -> np.ndarray:
    """The sorted intermediate dims re-initialized in (layer, expert): the same for gate, up and down."""
    rng = np.random.default_rng([seed, _DROP_TAG, layer, expert])
    return np.sort(rng.choice(width, int(round(ratio * width)), replace=False))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hashed_normal(key: int, index: np.ndarray) -> np.ndarray:
    """float32 standard normals, one per uint64 `index`, from a counter-based hash (Box-Muller): any
    subset of indices can be drawn alone and gets the same values."""
    h = _mix64(index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0 ** 32  # in (0, 1)
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2.0 ** 32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def drop_key(seed: int, target: str, layer: int, expert: int) -> int:
    kind = _FFN_KIND[target.split("/")[-2]]
    return int(np.random.SeedSequence([seed, _DROP_TAG, kind, layer, expert]).generate_state(1, np.uint64)[0])


def is_down(target: str) -> bool:
    return target.split("/")[-2] == "down"


def with_drop(x: np.ndarray, plan: LeafPlan, box: tuple[slice, ...], every: int, expert: int, mix,
              stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One copy of the source box `x` ([layers, D, F] or, for down, [layers, F, D]) with its dropped
    intermediate dims re-drawn; `stats` = (mean, std) per target layer of the original matrix."""
    value = np.array(x, dtype=plan.dtype, copy=True)
    down = is_down(plan.target)
    f_box, d_box = (box[1], box[2]) if down else (box[2], box[1])
    width, depth = (plan.shape[2], plan.shape[3]) if down else (plan.shape[3], plan.shape[2])
    first = target_index(plan, box, every, expert)[0].start
    d = np.arange(d_box.start, d_box.stop, dtype=np.uint64)
    step = max(1, _BLOCK // 8 // max(d.size, 1))  # the draw's float64 temporaries: ~40 bytes per element
    for r in range(value.shape[0]):
        layer = first + r
        dims = drop_indices(mix.noise_seed, layer, expert, width, mix.drop_ratio)
        dims = dims[(dims >= f_box.start) & (dims < f_box.stop)]
        key, mean, std = drop_key(mix.noise_seed, plan.target, layer, expert), stats[0][layer], stats[1][layer]
        row = value[r]  # a view: [D, F] or [F, D] (box-local)
        for i in range(0, dims.size, step):
            part = dims[i:i + step]
            drawn = hashed_normal(key, part.astype(np.uint64)[:, None] * np.uint64(depth) + d[None, :])  # [n, D]
            drawn *= np.float32(std)
            drawn += np.float32(mean)
            drawn = from_float32(drawn, plan.dtype)
            if down:
                row[part - f_box.start, :] = drawn
            else:
                row[:, part - f_box.start] = drawn.T
    return value


def row_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per first-axis row: (sum, sum of squares) in float64, and the elements per row."""
    x32 = to_float32(x).reshape(x.shape[0], -1)
    total = x32.sum(axis=1, dtype=np.float64)
    np.square(x32, out=x32)
    return total, x32.sum(axis=1, dtype=np.float64), x32.shape[1]


def scaled(x: np.ndarray, factor: float, dtype) -> np.ndarray:
    value = to_float32(x)
    value *= np.float32(factor)
    return from_float32(value, dtype)

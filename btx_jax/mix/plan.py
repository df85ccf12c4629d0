"""What the surgeon will do, decided before anything is read: the sources, the merge policy, one
``LeafPlan`` per target leaf, and the checks that the sources and the target config fit together.

The mapping, dense -> MoE (the one place it is written down):

- ``layers/mlp/{gate,up,down}/kernel`` [L, D, F] of FFN source e -> ``layers/moe/experts/*/kernel``
  [L, E, D, F] at expert e ("stack");
  with ``mix.granularity = g``, expert e is part e % g of the F axis (F/g wide) of slot e // g's FFN;
- ``layers/moe/router/kernel`` [L, D, E] is new ("router");
- every other param keeps its path and is merged by the first matching rule of ``mix.policy``
  (mean, weighted:w1,...,wN, seed, source:i; "merge").

With ``moe.moe_every = k`` > 1 only every k-th layer (k-1, 2k-1, ...) is an MoE block; the other
layers go to ``dense_layers/*`` [L/k, k-1, ...] (see ``select_layers``).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import numpy as np
from etils import epath

from btx_jax import checkpoint


class MixError(ValueError):
    """The surgeon's inputs do not fit together; the message says what and how to fix it."""


@dataclasses.dataclass
class Source:
    """One dense checkpoint: its step directory (a local path or a URL), step and {param path: (shape, dtype)}."""

    label: str  # "expert0", ..., "seed"
    path: str
    step: int
    params: dict[str, tuple[tuple[int, ...], str]]
    read: Callable[[str], np.ndarray] | None = None  # a Hugging Face directory's reader; None: an Orbax checkpoint


@dataclasses.dataclass
class LeafPlan:
    """How one target leaf is made."""

    target: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # stack | merge | router
    source_path: str  # the dense param path it is read from ("" for the router)
    rule: str
    sources: list[str]  # labels, in expert order for "stack"
    weights: list[float] | None = None
    granularity: int = 1  # stack: expert e is part e % g (F/g wide) of slot e // g's FFN (mix.granularity)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------------------- inputs

def paths(spec) -> list[str]:
    """'a,b' or ('a', 'b') -> ['a', 'b'] (empty entries dropped)."""
    if isinstance(spec, (tuple, list)):
        return [str(p) for p in spec if str(p)]
    return [p.strip() for p in str(spec).split(",") if p.strip()]


def open_source(label: str, path: str) -> Source:
    """A btx_jax checkpoint, or a Hugging Face Llama-family directory read through btx_jax.hf."""
    from btx_jax import hf

    if hf.is_hf_dir(path):
        try:
            reader = hf.DenseReader(path)
        except hf.HFError as e:
            raise MixError(f"{label} ({path}): {e}") from e
        return Source(label, path, 0, reader.params, reader.read)
    if not epath.Path(path).expanduser().exists():
        raise MixError(f"{label} checkpoint not found: {path!r}\n  fix: point config.mix to a training workdir, "
                       "its checkpoints/ directory or a step directory")
    try:
        directory = str(checkpoint.step_dir(path))
        params = checkpoint.param_metadata(directory)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise MixError(f"{label} ({path}) is not a readable btx_jax checkpoint: {e}") from e
    name = epath.Path(directory).name
    return Source(label, directory, int(name) if name.isdigit() else 0, params)


def parse_policy(spec) -> list[tuple[str, str]]:
    """'regex=rule;regex=rule' or ((regex, rule), ...) -> compiled-checked pairs."""
    if isinstance(spec, (tuple, list)):
        pairs = [tuple(p) for p in spec]
    else:
        pairs = [tuple(item.rsplit("=", 1)) for item in str(spec).split(";") if item.strip()]
    for pair in pairs:
        if len(pair) != 2:
            raise MixError(f"config.mix.policy: bad entry {pair!r}\n  fix: use 'regex=rule' items separated by ';'")
        try:
            re.compile(pair[0])
        except re.error as e:
            raise MixError(f"config.mix.policy: bad regex {pair[0]!r}: {e}") from e
    return [(p.strip(), r.strip()) for p, r in pairs]


def resolve_rule(rule: str, experts: list[Source], seed: Source | None) -> tuple[list[str], list[float]]:
    """A merge rule -> (source labels, weights summing to 1)."""
    n = len(experts)
    if rule == "mean":
        if not experts:
            return [seed.label], [1.0]
        return [s.label for s in experts], [1.0 / n] * n
    if rule == "seed":
        if seed is None:
            raise MixError("config.mix.policy uses the rule 'seed' but config.mix.seed is empty\n"
                           "  fix: give the seed checkpoint or use another rule")
        return [seed.label], [1.0]
    if rule.startswith("source:"):
        index = rule.split(":", 1)[1]
        if not index.isdigit() or int(index) >= n:
            raise MixError(f"config.mix.policy: rule {rule!r} names no source (there are {n} experts, 0..{n - 1})")
        return [experts[int(index)].label], [1.0]
    if rule.startswith("weighted:"):
        try:
            weights = [float(w) for w in rule.split(":", 1)[1].split(",")]
        except ValueError as e:
            raise MixError(f"config.mix.policy: bad weights in {rule!r}") from e
        if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
            raise MixError(f"config.mix.policy: {rule!r} needs {n} non-negative weights (one per expert) with a "
                           "positive sum")
        total = sum(weights)
        return [s.label for s in experts], [w / total for w in weights]
    raise MixError(f"config.mix.policy: unknown rule {rule!r}\n  fix: use mean, weighted:w1,...,wN, seed or source:i")


# ------------------------------------------------------------------------------------ the plan

EXPERT = re.compile(r"^layers/moe/experts/(gate|up|down)/kernel$")
ROUTER = "layers/moe/router/kernel"


def inner_axis(target: str) -> int:
    """The intermediate (F) axis of an expert leaf's dense source: [L, D, F] (gate, up), [L, F, D] (down)."""
    return 1 if target.endswith("down/kernel") else 2


def source_path_of(target: str) -> str:
    """Target MoE param path -> the dense param path it comes from."""
    m = EXPERT.match(target)
    if m:
        return f"layers/mlp/{m.group(1)}/kernel"
    if target.startswith("dense_layers/"):
        return "layers/" + target[len("dense_layers/"):]
    return target


def grouped(target: str, every: int) -> bool:
    """Whether the leaf's first axis is the layer axis regrouped by moe_every (see select_layers)."""
    return every > 1 and target.startswith(("layers/", "dense_layers/"))


def select_layers(array: np.ndarray, target: str, every: int) -> np.ndarray:
    """Dense [L, ...] -> the MoE model's layout: MoE blocks are layers k-1, 2k-1, ...; the rest go to
    dense_layers [L/k, k-1, ...]. Also right for a block of whole groups of k layers."""
    if not grouped(target, every):
        return array
    grouped_rows = array.reshape(array.shape[0] // every, every, *array.shape[1:])
    return grouped_rows[:, :every - 1] if target.startswith("dense_layers/") else grouped_rows[:, every - 1]


def expert_sources(mix, experts: list[Source], seed: Source | None, num_experts: int) -> list[str]:
    """Label of the source of each of the E experts."""
    ffn = [s.label for s in experts] + (["seed"] if mix.seed_expert else [])
    if not experts and seed is not None:
        ffn = ["seed"]  # sparse upcycling: every expert starts as the seed's FFN
    if not ffn:
        raise MixError("no FFN sources: config.mix.experts is empty and there is no seed\n"
                       "  fix: name the expert checkpoints (or a seed, for sparse upcycling)")
    if len(ffn) == num_experts:
        return ffn
    if (mix.copies or ffn == ["seed"]) and num_experts % len(ffn) == 0:
        return [ffn[i % len(ffn)] for i in range(num_experts)]
    extra = " plus the seed expert" if mix.seed_expert else ""
    raise MixError(f"config.moe.num_experts={num_experts} but there are {len(ffn)} FFN sources "
                   f"({len(experts)} experts{extra})\n  fix: set --config.moe.num_experts={len(ffn)}, or "
                   f"--config.mix.copies=true with num_experts a multiple of {len(ffn)}")


def make_plan(config, experts: list[Source], seed: Source | None, abstract_params: dict) -> list[LeafPlan]:
    """One LeafPlan per target leaf; checks that every source and the target config fit."""
    mix, every, g = config.mix, config.moe.moe_every, config.mix.get("granularity", 1)
    if g > 1 and (config.moe.num_experts % g or config.moe.top_k % g):
        raise MixError(f"config.mix.granularity={g} splits each FFN copy into {g} experts: moe.num_experts="
                       f"{config.moe.num_experts} and moe.top_k={config.moe.top_k} must be multiples of {g}\n"
                       f"  fix: num_experts = {g} x the copies, top_k = {g} x the dense top-k (model.mlp_dim = F/{g})")
    ffn = expert_sources(mix, experts, seed, config.moe.num_experts // g)
    if mix.get("upcycle", "copy") == "drop" and len(set(ffn)) == len(ffn):
        raise MixError("config.mix.upcycle=drop re-initializes part of each copy of an FFN, but no expert is a copy "
                       f"({', '.join(ffn)})\n  fix: upcycle from the seed alone (mix.experts empty), or set "
                       "--config.mix.copies=true with num_experts a multiple of the FFN sources")
    policy = parse_policy(mix.policy)
    reference = (experts or [seed])[0]
    plans = []
    for key, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        target = jax.tree_util.keystr(key, simple=True, separator="/")
        shape, dtype = tuple(leaf.shape), str(leaf.dtype)
        if target == ROUTER:
            plans.append(LeafPlan(target, shape, dtype, "router", "", config.mix.router_init, []))
            continue
        source_path = source_path_of(target)
        if source_path not in reference.params:
            raise MixError(f"target param {target} has no source: {reference.label} has no {source_path}\n"
                           "  fix: the sources must be dense btx_jax checkpoints of the same architecture")
        src_shape = reference.params[source_path][0]
        if EXPERT.match(target):
            inner = list(src_shape[1:])
            if src_shape[inner_axis(target)] % g == 0:
                inner[inner_axis(target) - 1] //= g
            expected = (src_shape[0] // every, len(ffn) * g, *inner)
            plans.append(LeafPlan(target, shape, dtype, "stack", source_path, "stack",
                                  [ffn[e // g] for e in range(len(ffn) * g)], granularity=g))
        else:
            probe = np.empty(src_shape, np.bool_)
            expected = select_layers(probe, target, every).shape if src_shape and src_shape[0] % every == 0 else None
            rule = next((r for pattern, r in policy if re.search(pattern, target)), "mean")
            labels, weights = resolve_rule(rule, experts, seed)
            plans.append(LeafPlan(target, shape, dtype, "merge", source_path, rule, labels, weights))
        if tuple(expected or ()) != shape:
            raise MixError(f"the MoE config does not fit the sources at {target}: it wants {shape}, the sources' "
                           f"{source_path} {src_shape} gives {expected}\n  fix: use the sources' model.* dims in "
                           "the mix config (and moe.num_experts = the number of FFN sources)")
    return plans


def check_same_architecture(sources: list[Source]) -> None:
    reference = sources[0]
    for other in sources[1:]:
        problems = [f"  {k}: missing in {other.label}" for k in reference.params if k not in other.params]
        problems += [f"  {k}: only in {other.label}" for k in other.params if k not in reference.params]
        # shapes only: a dtype difference (a bf16 Hugging Face seed, float32 branches) is cast away in the merge
        problems += [f"  {k}: {reference.label} {reference.params[k][0]} vs {other.label} {other.params[k][0]}"
                     for k in reference.params if k in other.params and reference.params[k][0] != other.params[k][0]]
        if problems:
            raise MixError(f"{other.label} ({other.path}) does not have the architecture of {reference.label} "
                           f"({reference.path}):\n" + "\n".join(problems[:20])
                           + "\n  fix: merge only checkpoints branched from one seed (same model config)")


def relative_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def branch_check(plans: list[LeafPlan], labels: list[str], read: Callable[[str, str], np.ndarray],
                 warn=print) -> dict[str, float]:
    """Relative distance of each source to the seed (or the first expert) on the smallest matrix,
    read whole with ``read(label, path)``: branches of one seed are close; independent
    initialisations are ~1.4 apart."""
    merges = [p for p in plans if p.kind == "merge" and len(p.shape) >= 2]
    if not merges or len(labels) < 2:
        return {}
    probe = min(merges, key=lambda p: p.nbytes).source_path
    ref_label = "seed" if "seed" in labels else labels[0]
    ref = read(ref_label, probe)
    distances = {label: relative_distance(read(label, probe), ref) for label in labels if label != ref_label}
    for label, d in distances.items():
        if d > 1.0:
            warn(f"[mix] warning: {label} is {d:.2f} (relative) from {ref_label} on {probe}; branches of one seed "
                 "are much closer (independent initialisations give ~1.4). Are these branches of one seed?")
    return distances

"""``python -m btx_jax.mix --config configs/mix_demo.py``: the checkpoint surgeon.

Merges N dense expert checkpoints (branches of one seed, written by ``btx_jax.train``) into
one MoE checkpoint that ``btx_jax.train --config.train.init_from=<output>`` finetunes:

- the FFN of source i becomes expert i of every MoE layer (``layers/mlp/*`` [L, D, F] ->
  ``layers/moe/experts/*`` [L, E, D, F]); optionally the seed's FFN as one more expert, or E
  experts filled by cycling through fewer sources (sparse upcycling), with symmetry-breaking noise;
- every other parameter is merged by the first matching (regex -> rule) of ``mix.policy``:
  mean (default), weighted:w1,...,wN, seed, source:i;
- the router is new: normal(std), zeros, or centroid (each expert's column is the mean hidden
  state, at that layer, of its own domain's tokens under the merged model).

It streams: one target leaf at a time is read from each source (partial restore), merged
and written with its target sharding, so host memory is bounded by the largest merged leaf
(centroid init also needs the merged model for its forward passes). Everything is checked
before anything is written; the output is written under a temporary name and renamed into
place only when complete, with ``manifest.json``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import resource
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

import btx_jax
from btx_jax import checkpoint, config as config_lib, sharding, steps
from btx_jax.state import make_setup


class MixError(ValueError):
    """The surgeon's inputs do not fit together; the message says what and how to fix it."""


@dataclasses.dataclass
class Source:
    """One dense checkpoint: its step directory, step and {param path: (shape, dtype)}."""

    label: str  # "expert0", ..., "seed"
    path: str
    step: int
    params: dict[str, tuple[tuple[int, ...], str]]


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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------------------- inputs

def _paths(spec) -> list[str]:
    if isinstance(spec, (tuple, list)):
        return [str(p) for p in spec if str(p)]
    return [p.strip() for p in str(spec).split(",") if p.strip()]


def open_source(label: str, path: str) -> Source:
    if not os.path.exists(os.path.expanduser(path)):
        raise MixError(f"{label} checkpoint not found: {path!r}\n  fix: point config.mix to a training workdir, "
                       "its checkpoints/ directory or a step directory")
    try:
        directory = checkpoint.step_dir(path)
        params = checkpoint.param_metadata(directory)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise MixError(f"{label} ({path}) is not a readable btx_jax checkpoint: {e}") from e
    step = int(os.path.basename(directory)) if os.path.basename(directory).isdigit() else 0
    return Source(label, directory, step, params)


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

_EXPERT = re.compile(r"^layers/moe/experts/(gate|up|down)/kernel$")
_ROUTER = "layers/moe/router/kernel"


def source_path_of(target: str) -> str:
    """Target MoE param path -> the dense param path it comes from."""
    m = _EXPERT.match(target)
    if m:
        return f"layers/mlp/{m.group(1)}/kernel"
    if target.startswith("dense_layers/"):
        return "layers/" + target[len("dense_layers/"):]
    return target


def select_layers(array: np.ndarray, target: str, every: int) -> np.ndarray:
    """Dense [L, ...] -> the MoE model's layout: MoE blocks are layers k-1, 2k-1, ...; the rest go to dense_layers."""
    if every == 1 or not (target.startswith("layers/") or target.startswith("dense_layers/")):
        return array
    grouped = array.reshape(array.shape[0] // every, every, *array.shape[1:])
    return grouped[:, :every - 1] if target.startswith("dense_layers/") else grouped[:, every - 1]


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
    mix, every = config.mix, config.moe.moe_every
    ffn = expert_sources(mix, experts, seed, config.moe.num_experts)
    policy = parse_policy(mix.policy)
    reference = (experts or [seed])[0]
    plans = []
    for key, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        target = jax.tree_util.keystr(key, simple=True, separator="/")
        shape, dtype = tuple(leaf.shape), str(leaf.dtype)
        if target == _ROUTER:
            plans.append(LeafPlan(target, shape, dtype, "router", "", config.mix.router_init, []))
            continue
        source_path = source_path_of(target)
        if source_path not in reference.params:
            raise MixError(f"target param {target} has no source: {reference.label} has no {source_path}\n"
                           "  fix: the sources must be dense btx_jax checkpoints of the same architecture")
        src_shape = reference.params[source_path][0]
        if _EXPERT.match(target):
            expected = (src_shape[0] // every, len(ffn), *src_shape[1:])
            plans.append(LeafPlan(target, shape, dtype, "stack", source_path, "stack", ffn))
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
        problems += [f"  {k}: {reference.label} {reference.params[k][0]} vs {other.label} {other.params[k][0]}"
                     for k in reference.params if k in other.params and reference.params[k] != other.params[k]]
        if problems:
            raise MixError(f"{other.label} ({other.path}) does not have the architecture of {reference.label} "
                           f"({reference.path}):\n" + "\n".join(problems[:20])
                           + "\n  fix: merge only checkpoints branched from one seed (same model config)")


# ------------------------------------------------------------------------------------ reading

def read_leaf(source: Source, path: str) -> np.ndarray:
    """One param of one checkpoint as a host numpy array (partial restore: nothing else is read)."""
    shape, dtype = source.params[path]
    item, restore_args = {}, {}
    node, args = item, restore_args
    keys = ["params", *path.split("/")]
    for k in keys[:-1]:
        node, args = node.setdefault(k, {}), args.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(shape, dtype)
    args[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(source.path, "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    for k in keys:
        restored = restored[k]
    array = np.asarray(restored)
    if not np.isfinite(array).all():
        raise MixError(f"{source.label} ({source.path}) has NaN or Inf in {path}\n"
                       "  fix: use an earlier checkpoint of that run; nothing was written")
    return array


def relative_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def branch_check(plans: list[LeafPlan], by_label: dict[str, Source], warn=print) -> dict[str, float]:
    """Relative distance of each source to the seed (or the first expert) on the smallest matrix:
    branches of one seed are close; independent initialisations are ~1.4 apart."""
    merges = [p for p in plans if p.kind == "merge" and len(p.shape) >= 2]
    if not merges or len(by_label) < 2:
        return {}
    probe = min(merges, key=lambda p: p.nbytes).source_path
    labels = list(by_label)
    ref_label = "seed" if "seed" in by_label else labels[0]
    ref = read_leaf(by_label[ref_label], probe)
    distances = {label: relative_distance(read_leaf(by_label[label], probe), ref) for label in labels if label != ref_label}
    for label, d in distances.items():
        if d > 1.0:
            warn(f"[mix] warning: {label} is {d:.2f} (relative) from {ref_label} on {probe}; branches of one seed "
                 "are much closer (independent initialisations give ~1.4). Are these branches of one seed?")
    return distances


# ------------------------------------------------------------------------------------ merging

def merge_leaf(plan: LeafPlan, by_label: dict[str, Source], every: int, noise_rng, copy_noise: float) -> np.ndarray:
    """The merged value of one target leaf, on the host, in the target dtype."""
    dtype = np.dtype(plan.dtype)
    if plan.kind == "stack":
        out = np.empty(plan.shape, dtype)
        first = {}  # label -> the expert slot that holds its first copy
        for expert, label in enumerate(plan.sources):
            if label in first:
                value = out[:, first[label]]
                if copy_noise > 0:
                    std = float(np.std(value.astype(np.float32)))
                    value = (value.astype(np.float32) + noise_rng.normal(0.0, copy_noise * std, value.shape)).astype(dtype)
            else:
                value = select_layers(read_leaf(by_label[label], plan.source_path), plan.target, every)
                first[label] = expert
            out[:, expert] = value
        return out
    if len(plan.sources) == 1:
        return select_layers(read_leaf(by_label[plan.sources[0]], plan.source_path), plan.target, every).astype(dtype)
    total = None
    for label, weight in zip(plan.sources, plan.weights):
        value = select_layers(read_leaf(by_label[label], plan.source_path), plan.target, every).astype(np.float32)
        total = value * weight if total is None else total + value * weight
    return total.astype(dtype)

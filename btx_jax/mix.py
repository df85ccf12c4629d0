"""``python -m btx_jax.mix --config configs/mix_demo.py``: the checkpoint surgeon.

Merges N dense expert checkpoints (branches of one seed, written by ``btx_jax.train``) into
one MoE checkpoint that ``btx_jax.train --config.train.init_from=<output>`` finetunes:

- the FFN of source i becomes expert i of every MoE layer (``layers/mlp/*`` [L, D, F] ->
  ``layers/moe/experts/*`` [L, E, D, F]); optionally the seed's FFN as one more expert, or E
  experts filled by cycling through fewer sources (sparse upcycling), with symmetry-breaking noise;
- every other parameter is merged by the first matching (regex -> rule) of ``mix.policy``:
  mean (default), weighted:w1,...,wN, seed, source:i;
- the router is new: normal(std), zeros (near-uniform: normal(std * 1e-3), see ``initial_router``),
  or centroid (each expert's column is the mean hidden state, at that layer, of its own domain's
  tokens under the merged model).

It streams: one target leaf at a time is read from each source (partial restore), merged on
the host and written (Orbax partial save), so host memory is bounded by the largest merged leaf
(centroid init also needs the merged model for its forward passes). Everything is checked
before anything is written; the output is written under a temporary name and renamed into
place only when complete, with ``manifest.json``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import re
import resource
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import psutil
from absl import app, flags, logging
from ml_collections import config_flags

import btx_jax
from btx_jax import checkpoint, compilation_cache, config as config_lib, sharding, steps
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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------------------- inputs

def _paths(spec) -> list[str]:
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
        # shapes only: a dtype difference (a bf16 Hugging Face seed, float32 branches) is cast away in the merge
        problems += [f"  {k}: {reference.label} {reference.params[k][0]} vs {other.label} {other.params[k][0]}"
                     for k in reference.params if k in other.params and reference.params[k][0] != other.params[k][0]]
        if problems:
            raise MixError(f"{other.label} ({other.path}) does not have the architecture of {reference.label} "
                           f"({reference.path}):\n" + "\n".join(problems[:20])
                           + "\n  fix: merge only checkpoints branched from one seed (same model config)")


# ------------------------------------------------------------------------------------ reading

def read_leaf(source: Source, path: str) -> np.ndarray:
    """One param of one source as a host numpy array (partial restore: nothing else is read)."""
    shape, dtype = source.params[path]
    array = source.read(path) if source.read else checkpoint.read_param(source.path, path, shape, dtype)
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

class _ReadAhead:
    """Futures of `read(label)` for labels in order, with at most `ahead` submitted and not yet taken."""

    def __init__(self, pool, labels, read, ahead: int = 2):
        self.pool, self.read, self.ahead = pool, read, ahead
        self.queue, self.pending = list(labels), {}
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.pending) < self.ahead:
            label = self.queue.pop(0)
            self.pending[label] = self.pool.submit(self.read, label)

    def pop(self, label):
        while label not in self.pending:  # taken out of order: submit up to it
            self.pending[self.queue[0]] = self.pool.submit(self.read, self.queue.pop(0))
        future = self.pending.pop(label)
        self._fill()
        return future


def merge_leaf(plan: LeafPlan, by_label: dict[str, Source], every: int, noise_rng, copy_noise: float) -> np.ndarray:
    """The merged value of one target leaf, on the host, in the target dtype."""
    dtype = np.dtype(plan.dtype)
    unique = list(dict.fromkeys(plan.sources))
    # Two sources are read at a time (decompression runs in parallel), and a read starts only when
    # an earlier one is taken: at most three sources' data (two read, one being copied) sit next
    # to the output buffer, however slowly the merge below runs.
    with concurrent.futures.ThreadPoolExecutor(min(len(unique), 2)) as pool:
        futures = _ReadAhead(pool, unique, lambda s: select_layers(read_leaf(by_label[s], plan.source_path),
                                                                   plan.target, every))
        if plan.kind == "stack":
            out = np.empty(plan.shape, dtype)
            first = {}  # label -> the expert slot that holds its first copy
            for expert, label in enumerate(plan.sources):
                if label in first:
                    value = out[:, first[label]]
                    if copy_noise > 0:
                        std = float(np.std(value.astype(np.float32)))
                        value = (value.astype(np.float32)
                                 + noise_rng.normal(0.0, copy_noise * std, value.shape)).astype(dtype)
                else:
                    value = futures.pop(label).result()
                    first[label] = expert
                out[:, expert] = value
                del value
            return out
        if len(plan.sources) == 1:
            return futures.pop(plan.sources[0]).result().astype(dtype)
        total = None
        for label, weight in zip(plan.sources, plan.weights):
            value = futures.pop(label).result().astype(np.float32)
            total = value * weight if total is None else total + value * weight
        return total.astype(dtype)


# ------------------------------------------------------------------------------------ routers

ZEROS_ROUTER_SCALE = 1e-3  # router_init=zeros: kernel std = router_std * this


def initial_router(plan: LeafPlan, mix, rng) -> np.ndarray:
    """The router kernel before finetuning.

    normal: normal(0, router_std). zeros: near-uniform routing, normal(0, router_std * 1e-3), not
    an exact zero: a zero kernel ties every probability and ``jax.lax.top_k`` breaks ties by
    index, so every token would go to experts 0..k-1. With unit-RMS router inputs the logits
    have std ~ router_std * 1e-3 * sqrt(D) (1.6e-4 at D=64, 2e-3 at D=8192 with router_std 0.02):
    the probabilities are 1/E to about that relative precision, while the top-k choice varies from
    token to token. centroid: exact zeros, a placeholder that ``centroid_router`` overwrites
    (it starts from its own zero kernel; no random numbers are drawn, so the copy noise is unchanged).
    """
    if mix.router_init == "normal":
        return rng.normal(0.0, mix.router_std, plan.shape).astype(plan.dtype)
    if mix.router_init == "zeros":
        return rng.normal(0.0, mix.router_std * ZEROS_ROUTER_SCALE, plan.shape).astype(plan.dtype)
    return np.zeros(plan.shape, plan.dtype)  # centroid: replaced by centroid_router


def centroid_router(config, setup, params: dict, ffn_labels: list[str], num_sources: int, out=print) -> np.ndarray:
    """Router [L_moe, D, E] whose column e, at each layer, is the mean router input of expert e's domain.

    Layers are set in order: the hidden states at layer l come from the merged model whose
    routers below l are already the centroids (the routers from l on are zero). Columns are
    centred (a shared component does not change the softmax) and scaled so that their mean
    norm is router_std * sqrt(D), the norm a normal(router_std) column has.
    """
    from btx_jax.data import pipeline

    domains = _paths(config.mix.domains) or sorted(config.data.domains.keys())
    if len(domains) != num_sources:
        raise MixError(f"config.mix.domains: centroid init needs the data domain of each of the {num_sources} expert "
                       f"sources, got {domains}\n  fix: --config.mix.domains=<domain of expert0>,<domain of expert1>,...")
    unknown = [d for d in domains if d not in config.data.domains]
    if unknown:
        raise MixError(f"config.mix.domains: {unknown} are not in config.data.domains ({sorted(config.data.domains)})")
    sources = pipeline.open_sources(config.data, "train", names=sorted(set(domains)))
    batches = {d: pipeline.eval_batches(config.data, sources[d], i, config.mix.centroid_batches)
               for i, d in enumerate(sorted(set(domains)))}
    shardings = steps.batch_shardings(setup.mesh)
    probe = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b, probe=True)[1]), setup.mesh)
    router_leaf = params["layers"]["moe"]["router"]["kernel"]
    layers, d_model, _ = router_leaf.shape
    router = np.zeros(router_leaf.shape, np.float32)
    for layer in range(layers):
        params["layers"]["moe"]["router"]["kernel"] = jax.device_put(router.astype(router_leaf.dtype), router_leaf.sharding)
        means = {}
        for domain, domain_batches in batches.items():
            total, count = np.zeros(d_model), 0.0
            for batch in domain_batches:
                aux = jax.device_get(probe(params, steps.to_global(batch, shardings)))
                total, count = total + aux["router_input_sum"][layer], count + float(aux["router_input_count"][layer])
            means[domain] = total / max(count, 1.0)
        domain_of = {f"expert{i}": d for i, d in enumerate(domains)}
        columns = np.stack([means[domain_of[label]] if label in domain_of else np.mean(list(means.values()), axis=0)
                            for label in ffn_labels], axis=1)
        columns -= columns.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(columns, axis=0).mean()
        router[layer] = columns * (config.mix.router_std * np.sqrt(d_model) / max(norm, 1e-12))
        out(f"[mix] centroid router, layer {layer}: column norms {np.round(np.linalg.norm(router[layer], axis=0), 3)}")
    params["layers"]["moe"]["router"]["kernel"] = jax.device_put(router.astype(router_leaf.dtype), router_leaf.sharding)
    return router.astype(router_leaf.dtype)


# ------------------------------------------------------------------------------------ writing

def _leaf(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def to_target(value: np.ndarray, abstract) -> jax.Array:
    """Host array -> a jax.Array with the target sharding (each device receives only its slice).

    Leaves are written to disk from the host array itself: on a CPU mesh every replica of a
    replicated leaf would be another copy in host memory, and the finetuning run reshards on
    load anyway (``checkpoint.load_params`` restores onto the run's own shardings)."""
    return jax.make_array_from_callback(value.shape, abstract.sharding, lambda index: value[index])


def print_plan(plans: list[LeafPlan], out=print) -> None:
    out(f"{'target leaf':<40} {'rule':<16} {'shape':<26} {'dtype':<9} {'MB':>9}  sources")
    for p in plans:
        sources = ",".join(p.sources) if p.kind != "router" else "-"
        if p.weights and len(set(p.weights)) > 1:
            sources = ",".join(f"{s}*{w:.3g}" for s, w in zip(p.sources, p.weights))
        out(f"{p.target:<40} {p.rule:<16} {str(p.shape):<26} {p.dtype:<9} {p.nbytes / 1e6:>9.2f}  {sources}")
    out(f"{len(plans)} leaves, {sum(p.nbytes for p in plans) / 1e9:.3f} GB")


def _peak_rss_gb() -> float:
    """This process's peak resident memory. /proc's VmHWM, because ru_maxrss carries over the
    parent's peak across fork + exec (a child of a big process would report the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def run(config, dry_run: bool = False, out=print) -> dict:
    """Validates everything, then streams the merge into config.mix.output; returns the manifest."""
    from tqdm import tqdm

    config_lib.validate(config)
    mix = config.mix
    if not config.moe.num_experts:
        raise MixError("config.moe.num_experts is 0: the target must be an MoE model\n"
                       "  fix: set moe.num_experts (= the number of FFN sources) in the mix config")
    if mix.router_init not in config_lib.ROUTER_INITS:
        raise MixError(f"config.mix.router_init: unknown {mix.router_init!r}\n  fix: use one of {config_lib.ROUTER_INITS}")
    output = os.path.abspath(os.path.expanduser(mix.output)) if mix.output else ""
    if not output and not dry_run:
        raise MixError("config.mix.output is empty\n  fix: --config.mix.output=<new directory>")
    if output and os.path.exists(output) and not dry_run:
        raise MixError(f"output {output} already exists\n  fix: remove it or choose another config.mix.output")
    experts = [open_source(f"expert{i}", p) for i, p in enumerate(_paths(mix.experts))]
    seed = open_source("seed", mix.seed) if mix.seed else None
    by_label = {s.label: s for s in experts + ([seed] if seed else [])}
    if mix.seed_expert and seed is None:
        raise MixError("config.mix.seed_expert is true but config.mix.seed is empty\n  fix: give the seed checkpoint")
    check_same_architecture(list(by_label.values()))
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisible(config, mesh)
    setup = make_setup(config, mesh)
    plans = make_plan(config, experts, seed, setup.abstract_params)
    if dry_run:
        print_plan(plans, out)
        return {}
    distances = branch_check(plans, by_label, warn=out)

    rng = np.random.default_rng(mix.noise_seed)
    ffn_labels = next(p.sources for p in plans if p.kind == "stack")
    keep = {} if mix.router_init == "centroid" else None  # centroid init runs the merged model
    total = sum(p.nbytes for p in plans)
    rss_before = psutil.Process().memory_info().rss
    start, read_bytes = time.perf_counter(), 0
    out(f"[mix] {len(experts)} experts{' + seed' if seed else ''} -> {config.moe.num_experts}-expert MoE "
        f"({', '.join(ffn_labels)}), {total / 1e9:.3f} GB, router {mix.router_init}")
    with checkpoint.ParamWriter(output, "[mix]", out) as writer:
        with tqdm(total=total, unit="B", unit_scale=True, desc="[mix]", mininterval=1.0, file=sys.stdout) as bar:
            for plan in plans:
                if plan.kind == "router":
                    value = initial_router(plan, mix, rng)
                else:
                    value = merge_leaf(plan, by_label, config.moe.moe_every, rng, mix.copy_noise)
                    read_bytes += sum(int(np.prod(by_label[s].params[plan.source_path][0]))
                                      * np.dtype(by_label[s].params[plan.source_path][1]).itemsize
                                      for s in set(plan.sources))
                if keep is not None:  # centroid init runs the merged model: keep it on the devices
                    keep[plan.target] = to_target(value, _leaf(setup.abstract_params, plan.target))
                if not (keep is not None and plan.kind == "router"):
                    # Written before the next leaf is read: overlapping the two was ~20% faster but made
                    # peak memory depend on timing (up to 3.7x the leaf under load).
                    writer.write(plan.target, value)
                del value
                bar.update(plan.nbytes)
        if keep is not None:
            params = {}
            for path, array in keep.items():
                checkpoint.nested(params, path, array)
            router = centroid_router(config, setup, params, ffn_labels, len(experts), out)
            del params, keep
            writer.write(_ROUTER, router)
        seconds = time.perf_counter() - start
        manifest = {
            "format": "btx_jax.mix/1", "btx_jax_version": btx_jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "experts": [{"label": s.label, "path": s.path, "step": s.step} for s in experts],
            "seed": {"path": seed.path, "step": seed.step} if seed else None,
            "expert_sources": ffn_labels, "num_experts": config.moe.num_experts, "moe_every": config.moe.moe_every,
            "seed_expert": bool(mix.seed_expert), "copies": bool(mix.copies), "copy_noise": mix.copy_noise,
            "policy": [list(p) for p in parse_policy(mix.policy)], "router_init": mix.router_init,
            "router_std": mix.router_std, "branch_distances": distances,
            "leaves": {p.target: {"rule": p.rule, "sources": p.sources, "weights": p.weights, "shape": list(p.shape),
                                  "dtype": p.dtype} for p in plans},
            "bytes_written": total, "bytes_read": read_bytes, "seconds": round(seconds, 3),
            "largest_leaf_bytes": max(p.nbytes for p in plans), "rss_before_merge_bytes": rss_before,
            "peak_rss_bytes": int(_peak_rss_gb() * 1e9),
            "model": config.model.to_dict(), "moe": config.moe.to_dict(), "tokenizer": config.data.tokenizer,
        }
        writer.finish(manifest)
    out(f"[mix] wrote {output}: {total / 1e9:.3f} GB in {seconds:.1f} s ({total / seconds / 1e6:.0f} MB/s written, "
        f"{read_bytes / 1e9:.3f} GB read), peak RSS {_peak_rss_gb():.2f} GB ({rss_before / 1e9:.2f} GB before merging; "
        f"largest leaf {max(p.nbytes for p in plans) / 1e9:.3f} GB)\n"
        f"[mix] finetune it: python -m btx_jax.train --config <moe config> --config.train.init_from={output}")
    return manifest


def _define_flags():
    global _CONFIG, _DRY_RUN
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Mix config, e.g. configs/mix_demo.py.", lock_config=True)
    _DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (each target leaf, its sources, rule, shape, bytes) "
                                 "and exit without writing.")


def main(argv):
    del argv
    compilation_cache.enable()
    logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, dry_run=_DRY_RUN.value)
    except (MixError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: writing the merged checkpoint failed: {e}\n  nothing was written at config.mix.output; "
              "fix the cause (e.g. free disk space) and rerun", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = ["--dry_run" if a == "--dry-run" else a for a in sys.argv]
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)

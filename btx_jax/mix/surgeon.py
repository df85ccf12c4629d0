"""``run``: checks everything, then streams the merge into config.mix.output and writes its manifest."""
from __future__ import annotations

import datetime
import resource
import sys
import time

import jax
import numpy as np
import psutil
from etils import epath

import btx_jax
from btx_jax import checkpoint, config as config_lib, distributed, sharding
from btx_jax.mix import router_init, stream as stream_lib
from btx_jax.mix.plan import (ROUTER, LeafPlan, MixError, branch_check, check_same_architecture, make_plan,
                              open_source, parse_policy, paths)
from btx_jax.state import make_setup

AUTO_BUDGET_SOURCE_LEAVES = 2  # memory_budget=0: this many times the largest source leaf


def peak_rss_bytes() -> int:
    """This process's peak resident memory. /proc's VmHWM, because ru_maxrss carries over the
    parent's peak across fork + exec (a child of a big process would report the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # local: this process
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def memory_budget(mix, plans: list[LeafPlan], by_label: dict) -> int:
    """Bytes of tiles in flight: config.mix.memory_budget (GB), or by default twice the largest source leaf
    (raised to the largest tile by the caller)."""
    if mix.memory_budget < 0:
        raise MixError(f"config.mix.memory_budget={mix.memory_budget} is negative\n"
                       "  fix: give GB of host memory for the merge, or 0 for twice the largest source leaf")
    if mix.memory_budget:
        return int(mix.memory_budget * 1e9)
    largest = max(int(np.prod(shape)) * np.dtype(dtype).itemsize
                  for p in plans if p.kind != "router" for label in set(p.sources)
                  for shape, dtype in [by_label[label].params[p.source_path]])
    return AUTO_BUDGET_SOURCE_LEAVES * largest


def print_plan(plans: list[LeafPlan], stream: stream_lib.Stream, out=print) -> None:
    out(f"{'target leaf':<40} {'rule':<16} {'shape':<26} {'dtype':<9} {'MB':>9} {'tiles':>5}  sources")
    counts = {}
    for tile in stream.tiles:
        counts[tile.plan.target] = counts.get(tile.plan.target, 0) + 1
    for p in plans:
        sources = ",".join(p.sources) if p.kind != "router" else "-"
        if p.weights and len(set(p.weights)) > 1:
            sources = ",".join(f"{s}*{w:.3g}" for s, w in zip(p.sources, p.weights))
        out(f"{p.target:<40} {p.rule:<16} {str(p.shape):<26} {p.dtype:<9} {p.nbytes / 1e6:>9.2f} "
            f"{counts[p.target]:>5}  {sources}")
    out(f"{len(plans)} leaves, {sum(p.nbytes for p in plans) / 1e9:.3f} GB in {len(stream.tiles)} tiles; memory budget "
        f"{stream.budget / 1e9:.3f} GB (largest tile {max(t.work for t in stream.tiles) / 1e9:.3f} GB)")


def _inputs(config, dry_run: bool):
    """Checks the config and opens the sources: (experts, seed, {label: source}, output)."""
    config_lib.validate(config)
    mix = config.mix
    if not config.moe.num_experts:
        raise MixError("config.moe.num_experts is 0: the target must be an MoE model\n"
                       "  fix: set moe.num_experts (= the number of FFN sources) in the mix config")
    if mix.router_init not in config_lib.ROUTER_INITS:
        raise MixError(f"config.mix.router_init: unknown {mix.router_init!r}\n  fix: use one of {config_lib.ROUTER_INITS}")
    output = str(mix.output or "")
    if not output and not dry_run:
        raise MixError("config.mix.output is empty\n  fix: --config.mix.output=<new directory>")
    if output and epath.Path(output).expanduser().exists() and not dry_run:
        raise MixError(f"output {output} already exists\n  fix: remove it or choose another config.mix.output")
    experts = [open_source(f"expert{i}", p) for i, p in enumerate(paths(mix.experts))]
    seed = open_source("seed", mix.seed) if mix.seed else None
    by_label = {s.label: s for s in experts + ([seed] if seed else [])}
    if mix.seed_expert and seed is None:
        raise MixError("config.mix.seed_expert is true but config.mix.seed is empty\n  fix: give the seed checkpoint")
    check_same_architecture(list(by_label.values()))
    return experts, seed, by_label, output


def _gathered(value: int) -> list[int]:
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.array([value], np.int64))).reshape(-1)]


def run(config, dry_run: bool = False, out=print) -> dict:
    """Validates everything, then streams the merge into config.mix.output; returns the manifest.

    In a multi-process job (``btx_jax.distributed``) every process calls it: each makes and writes
    its share of the tiles into the one output, and process 0 writes the manifest."""
    with stream_lib.compact_heap() as trim:
        return _run(config, dry_run, out, trim)


def _run(config, dry_run: bool, out, trim) -> dict:
    mix, main = config.mix, jax.process_index() == 0
    say = out if main else (lambda *a, **k: None)
    experts, seed, by_label, output = _inputs(config, dry_run)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisible(config, mesh)
    setup = make_setup(config, mesh)
    plans = make_plan(config, experts, seed, setup.abstract_params)
    domains = router_init.centroid_domains(config, len(experts)) if mix.router_init == "centroid" else None
    sources = stream_lib.Sources(by_label)
    stream = stream_lib.Stream(plans, sources, mix, config.moe.moe_every, memory_budget(mix, plans, by_label))
    largest_tile = max(t.work for t in stream.tiles)
    if not mix.memory_budget:  # auto: also enough for the largest tile, which cannot be cut smaller
        stream.budget = max(stream.budget, largest_tile)
    elif largest_tile > stream.budget:
        say(f"[mix] note: config.mix.memory_budget={mix.memory_budget} GB is below the largest tile "
            f"({largest_tile / 1e9:.3f} GB: one chunk of a source leaf, which is never split); that tile runs alone "
            "and peaks above the budget")
    if dry_run:
        print_plan(plans, stream, say)
        return {}
    distances = branch_check(plans, list(by_label), sources.read_whole, warn=say)

    ffn_labels = next(p.sources for p in plans if p.kind == "stack")
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    say(f"[mix] {len(experts)} experts{' + seed' if seed else ''} -> {config.moe.num_experts}-expert MoE "
        f"({', '.join(ffn_labels)}), {sum(p.nbytes for p in plans) / 1e9:.3f} GB in {len(stream.tiles)} tiles, "
        f"router {mix.router_init}, memory budget {stream.budget / 1e9:.3f} GB"
        + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    with checkpoint.ParamWriter(output, "[mix]", say) as writer:
        _write(writer, stream, trim, main)
        if mix.router_init == "centroid":  # runs the merged model: load it (sharded) from what was just written
            params = checkpoint.load_params(str(writer.tmp), setup.abstract_params)
            router = router_init.centroid_router(config, setup, params, ffn_labels, domains, say)
            del params
            if main:
                stream_lib.overwrite_leaf(str(writer.tmp), ROUTER, router)
            distributed.barrier("mix:router")
        seconds = time.perf_counter() - start
        manifest = _manifest(config, experts, seed, plans, stream, distances, seconds, rss_before)
        writer.finish(manifest)
    total, peak = manifest["bytes_written"], manifest["peak_rss_bytes"]
    say(f"[mix] wrote {output}: {total / 1e9:.3f} GB in {seconds:.1f} s ({total / seconds / 1e6:.0f} MB/s written, "
        f"{manifest['bytes_read'] / 1e9:.3f} GB read), peak RSS {peak / 1e9:.2f} GB ({rss_before / 1e9:.2f} GB before "
        f"merging; budget {stream.budget / 1e9:.3f} GB)\n"
        f"[mix] finetune it: python -m btx_jax.train --config <moe config> --config.train.init_from={output}")
    return manifest


def _write(writer: checkpoint.ParamWriter, stream: stream_lib.Stream, trim, main: bool) -> None:
    """Every process writes its tiles (one Orbax save of the whole tree), with a progress bar on process 0."""
    from tqdm import tqdm

    with tqdm(total=sum(t.nbytes for t in stream.mine), unit="B", unit_scale=True, desc="[mix]", mininterval=1.0,
              file=sys.stdout, disable=not main) as bar:
        stream.progress, stream.trim = bar.update, trim
        writer.write_all(stream.tree(), stream_lib.registry(stream))


def _manifest(config, experts, seed, plans: list[LeafPlan], stream: stream_lib.Stream, distances: dict,
              seconds: float, rss_before: int) -> dict:
    mix = config.mix
    peaks = _gathered(peak_rss_bytes())
    return {
        "format": "btx_jax.mix/1", "btx_jax_version": btx_jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "experts": [{"label": s.label, "path": s.path, "step": s.step} for s in experts],
        "seed": {"path": seed.path, "step": seed.step} if seed else None,
        "expert_sources": next(p.sources for p in plans if p.kind == "stack"), "num_experts": config.moe.num_experts,
        "moe_every": config.moe.moe_every, "seed_expert": bool(mix.seed_expert), "copies": bool(mix.copies),
        "copy_noise": mix.copy_noise, "upcycle": mix.get("upcycle", "copy"), "drop_ratio": mix.get("drop_ratio", 0.5),
        "granularity": mix.get("granularity", 1),
        "policy": [list(p) for p in parse_policy(mix.policy)],
        "router_init": mix.router_init, "router_std": mix.router_std, "branch_distances": distances,
        "leaves": {p.target: {"rule": p.rule, "sources": p.sources, "weights": p.weights, "shape": list(p.shape),
                              "dtype": p.dtype} for p in plans},
        "bytes_written": sum(p.nbytes for p in plans), "bytes_read": sum(t.read_bytes for t in stream.tiles),
        "seconds": round(seconds, 3), "processes": jax.process_count(), "tiles": len(stream.tiles),
        "tiles_per_process": [stream.owners.count(p) for p in range(jax.process_count())],
        "memory_budget_bytes": stream.budget, "largest_tile_work_bytes": max(t.work for t in stream.tiles),
        "largest_leaf_bytes": max(p.nbytes for p in plans), "rss_before_merge_bytes": rss_before,
        "rss_at_first_tile_bytes": stream.rss_at_start, "peak_rss_bytes": max(peaks),
        "peak_rss_bytes_per_process": peaks,
        "model": config.model.to_dict(), "moe": config.moe.to_dict(), "tokenizer": config.data.tokenizer,
    }

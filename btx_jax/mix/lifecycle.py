"""Adding and removing experts of a merged (or finetuned) MoE checkpoint: the expert lifecycle after BTX.

``python -m btx_jax.mix add --moe CKPT --expert DENSE --domain NAME --output OUT --config CFG``: a dense
expert branched from the MoE's seed (Nexus / Branch-Train-Stitch / FlexOlmo) becomes expert E of every MoE
layer (E + 1 experts): its FFN is appended to the expert stacks and its router column is the new domain's
centroid, the mean router input of that domain's tokens at each MoE layer under the MoE model, centred on
the mean of the training domains' centroids (the centroid router's columns are centred the same way) and
scaled to the mean norm of the existing columns at that layer. The existing experts, router columns and
every other param are copied bit for bit.

``python -m btx_jax.mix remove --moe CKPT --expert I --output OUT``: expert I's weights and router column
are dropped (E - 1 experts): the model ``moe.masked_experts=I`` evaluates, made permanent.

Both read and write one leaf at a time (host memory is about three leaves) and write a params-only
checkpoint (``checkpoint.ParamWriter``) whose ``manifest.json`` carries the model and the MoE config with
the new ``num_experts``, the expert labels and the history of additions and removals; the router's
selection bias of a ``moe.balance="bias"`` run is not carried (finetune again, or evaluate without it).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time

import numpy as np
from etils import epath

import btx_jax
from btx_jax import checkpoint, paths as paths_lib
from btx_jax.mix.plan import EXPERT, ROUTER, MixError, relative_distance, select_layers, source_path_of

BRANCH_DISTANCE_WARNING = 1.0  # relative; branches of one seed are far closer, independent inits ~1.4


def _open_moe(path: str) -> tuple[str, dict, dict, dict]:
    """(step dir, {leaf: (shape, dtype)}, saved model config, manifest or {}) of an MoE checkpoint."""
    if not epath.Path(str(path)).expanduser().exists():
        raise MixError(f"MoE checkpoint not found: {path!r}\n  fix: give a training workdir, its checkpoints/ "
                       "directory, a step directory or a surgeon output")
    try:
        directory = checkpoint.step_dir(path)
        meta = checkpoint.param_metadata(directory)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise MixError(f"{path} is not a readable btx_jax checkpoint: {e}") from e
    if ROUTER not in meta:
        raise MixError(f"{path} is not an MoE checkpoint (no {ROUTER})\n  fix: give the merged or finetuned MoE")
    try:
        saved = checkpoint.saved_model_config(directory)
    except checkpoint.CheckpointError as e:
        raise MixError(f"{path}: {e}") from e
    manifest_file = epath.Path(directory) / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    return directory, meta, saved, manifest


def _check_output(output: str) -> None:
    if not output:
        raise MixError("--output is empty\n  fix: give a new directory")
    if paths_lib.resolve(output).exists():
        raise MixError(f"output {output} already exists\n  fix: remove it or choose another --output")


def _labels(manifest: dict, num_experts: int) -> list[str]:
    labels = manifest.get("expert_labels") or manifest.get("expert_sources")
    return list(labels) if labels and len(labels) == num_experts else [f"expert{i}" for i in range(num_experts)]


def _manifest(saved: dict, base: dict, num_experts: int, labels: list[str], event: dict, seconds: float,
              moe_overrides: dict) -> dict:
    moe = {**saved["moe"], "num_experts": num_experts, **moe_overrides}
    return {"format": "btx_jax.mix/1", "btx_jax_version": btx_jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_experts": num_experts, "moe_every": moe.get("moe_every", 1), "expert_labels": labels,
            "history": [*base.get("history", []), event], "seconds": round(seconds, 3),
            "model": saved["model"], "moe": moe, "tokenizer": saved["tokenizer"],
            **({"hf": saved["hf"]} if saved.get("hf") else {})}


def _remap_masked(masked: str, removed: int) -> str:
    """moe.masked_experts after expert `removed` is gone: it leaves the list, the later indices shift down."""
    kept = [int(i) for i in str(masked or "").split(",") if i.strip() and int(i) != removed]
    return ",".join(str(i - (i > removed)) for i in kept)


# ------------------------------------------------------------------------------------------- add

def domain_means(config, moe_dir: str, saved: dict, domains: list[str]) -> dict[str, np.ndarray]:
    """{domain: [L_moe, D]}: the mean router input of each domain's tokens at every MoE layer under the MoE
    model of `moe_dir` (one forward pass per batch; ``mix.centroid_batches`` train batches per domain)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from btx_jax import sharding, steps
    from btx_jax.mix.router_init import _domain_batches
    from btx_jax.state import make_setup

    c = copy.deepcopy(config)
    c.model.update(**{k: v for k, v in saved["model"].items() if k in c.model})
    c.moe.update(**{k: v for k, v in saved["moe"].items() if k in c.moe})
    mesh = sharding.make_mesh(c.mesh)
    sharding.check_divisible(c, mesh)
    setup = make_setup(c, mesh)
    params = checkpoint.load_params(moe_dir, setup.abstract_params)
    shardings = steps.batch_shardings(setup.mesh)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    probe = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b, probe=True)[1],
                                      out_shardings=replicated), setup.mesh)
    means = {}
    for domain, batches in _domain_batches(c, domains, shardings["inputs"]).items():
        total, count = 0.0, 0.0
        for batch in batches:
            aux = probe(params, steps.to_global(batch, shardings))
            total = total + np.asarray(aux["router_input_sum"].addressable_data(0), np.float64)
            count = count + np.asarray(aux["router_input_count"].addressable_data(0), np.float64)
        means[domain] = total / np.maximum(count, 1.0)[:, None]
    return means


def new_router_column(config, moe_dir: str, saved: dict, domain: str, router: np.ndarray, out=print) -> np.ndarray:
    """[L_moe, D]: the new domain's centroid minus the mean of the training domains' centroids, at each
    layer scaled to the mean norm of the existing router columns (router [L_moe, D, E])."""
    known = {**dict(config.data.domains), **dict(config.data.eval_domains)}
    if domain not in known:
        raise MixError(f"--domain {domain!r} is not a data domain of the config (data.domains or data.eval_domains: "
                       f"{sorted(known)})\n  fix: add it, e.g. --config.data.eval_domains.{domain}=demo:{domain}")
    reference = [d for d in sorted(config.data.domains) if d != domain]
    means = domain_means(config, moe_dir, saved, [domain, *reference])
    column = means[domain] - (np.mean([means[d] for d in reference], axis=0) if reference else 0.0)
    target = np.linalg.norm(router.astype(np.float64), axis=1).mean(axis=1)  # [L_moe]
    norm = np.linalg.norm(column, axis=1)
    column = column * (target / np.maximum(norm, 1e-12))[:, None]
    out(f"[mix] new router column ({domain}): centroid against {','.join(reference) or '-'}, norms "
        f"{np.round(np.linalg.norm(column, axis=1), 3)} (the mean norm of the existing columns)")
    return column


def _check_dense(meta: dict, dense_meta: dict, every: int, dense_path: str) -> list[tuple[str, str]]:
    """Every MoE leaf's dense counterpart, with exactly the shape it needs: [(moe leaf, dense leaf)] of the
    shared (non-expert, non-router) params."""
    problems, shared, used = [], [], set()
    for target, (shape, _) in meta.items():
        if target == ROUTER:
            continue
        source = source_path_of(target)
        used.add(source)
        if source not in dense_meta:
            problems.append(f"  {source}: missing in the dense expert (for {target})")
            continue
        src_shape = dense_meta[source][0]
        if EXPERT.match(target):
            want = (shape[0], *shape[2:])
        else:
            shared.append((target, source))
            want = tuple(shape)
        got = (select_layers(np.empty(src_shape, np.bool_), target, every).shape
               if src_shape and src_shape[0] % every == 0 else None)
        if got is None or tuple(got) != want:
            problems.append(f"  {target}: the MoE needs {want}, the dense expert's {source} {src_shape} gives {got}")
    problems += [f"  {k}: only in the dense expert" for k in dense_meta if k not in used]
    if problems:
        raise MixError(f"the dense expert {dense_path} does not fit the MoE's architecture:\n" + "\n".join(problems[:20])
                       + "\n  fix: add a dense expert branched from the MoE's seed (the same model config)")
    return shared


def add_expert(moe: str, expert: str, domain: str, output: str, config=None, out=print) -> dict:
    """Writes `output`: the MoE of `moe` plus the dense checkpoint `expert` as its last expert; returns the
    manifest. `config` (its data section, ``mix.centroid_batches`` and mesh) gives the new router column."""
    start = time.perf_counter()
    _check_output(output)
    moe_dir, meta, saved, base = _open_moe(moe)
    if not epath.Path(str(expert)).expanduser().exists():
        raise MixError(f"dense expert checkpoint not found: {expert!r}")
    try:
        dense_dir = checkpoint.step_dir(expert)
        dense_meta = checkpoint.param_metadata(dense_dir)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise MixError(f"{expert} is not a readable btx_jax checkpoint: {e}") from e
    if any(k.startswith("layers/moe/") for k in dense_meta):
        raise MixError(f"{expert} is an MoE checkpoint\n  fix: add a dense expert (a branch of the seed)")
    if config is None:
        raise MixError("adding an expert needs a config for its router column (the new domain's data)\n"
                       "  fix: --config configs/btx_demo.py (its data section names the domain)")
    every = int(saved["moe"].get("moe_every", 1) or 1)
    num_experts = meta[ROUTER][0][2]
    shared = _check_dense(meta, dense_meta, every, str(expert))

    # the branch check: the dense expert's shared params against the MoE's, on the smallest matrix
    # (a weight matrix: norm scales start at one in any initialisation)
    matrices = [(t, s) for t, s in shared if len(meta[t][0]) >= 2 and t.endswith(("/kernel", "/embedding"))]
    distance = None
    if matrices:
        target, source = min(matrices, key=lambda ts: int(np.prod(meta[ts[0]][0])))
        mine = checkpoint.read_param(moe_dir, target, *meta[target])
        theirs = select_layers(checkpoint.read_param(dense_dir, source, *dense_meta[source]), target, every)
        distance = relative_distance(theirs, mine)
        if distance > BRANCH_DISTANCE_WARNING:
            out(f"[mix] warning: the dense expert is {distance:.2f} (relative) from the MoE on {target}; branches of "
                "the MoE's seed are much closer (independent initialisations give ~1.4). Is it a branch of that seed?")

    router = checkpoint.read_param(moe_dir, ROUTER, *meta[ROUTER])
    column = new_router_column(config, moe_dir, saved, domain, router, out)
    out(f"[mix] adding {expert} ({domain}) to {moe_dir}: {num_experts} -> {num_experts + 1} experts -> {output}")
    with checkpoint.ParamWriter(output, "[mix]", out) as writer:
        for name, (shape, dtype) in meta.items():
            value = router if name == ROUTER else checkpoint.read_param(moe_dir, name, shape, dtype)
            if name == ROUTER:
                value = np.concatenate([value, column[:, :, None].astype(value.dtype)], axis=2)
            elif EXPERT.match(name):
                ffn = select_layers(checkpoint.read_param(dense_dir, source_path_of(name),
                                                          *dense_meta[source_path_of(name)]), name, every)
                value = np.concatenate([value, ffn[:, None].astype(value.dtype)], axis=1)
            writer.write(name, value)
            del value
        event = {"op": "add", "index": num_experts, "domain": domain, "expert": str(dense_dir), "moe": str(moe_dir),
                 "branch_distance": distance}
        manifest = _manifest(saved, base, num_experts + 1, [*_labels(base, num_experts), domain], event,
                             time.perf_counter() - start, {})
        writer.finish(manifest)
    out(f"[mix] wrote {output} ({num_experts + 1} experts) in {manifest['seconds']:.1f} s")
    return manifest


# ---------------------------------------------------------------------------------------- remove

def remove_expert(moe: str, index: int, output: str, out=print) -> dict:
    """Writes `output`: the MoE of `moe` without expert `index` (its FFN and router column); returns the manifest."""
    start = time.perf_counter()
    _check_output(output)
    moe_dir, meta, saved, base = _open_moe(moe)
    num_experts = meta[ROUTER][0][2]
    if not 0 <= index < num_experts:
        raise MixError(f"--expert {index}: no such expert (the MoE has {num_experts}: 0..{num_experts - 1})")
    top_k = int(saved["moe"].get("top_k", 1))
    if num_experts - 1 < max(top_k, 1):
        raise MixError(f"removing expert {index} of {num_experts} leaves fewer than top_k={top_k}\n"
                       "  fix: keep at least top_k experts")
    out(f"[mix] removing expert {index} from {moe_dir}: {num_experts} -> {num_experts - 1} experts -> {output}")
    with checkpoint.ParamWriter(output, "[mix]", out) as writer:
        for name, (shape, dtype) in meta.items():
            value = checkpoint.read_param(moe_dir, name, shape, dtype)
            if name == ROUTER:
                value = np.delete(value, index, axis=2)
            elif EXPERT.match(name):
                value = np.delete(value, index, axis=1)
            writer.write(name, value)
            del value
        labels = _labels(base, num_experts)
        event = {"op": "remove", "index": index, "label": labels[index], "moe": str(moe_dir)}
        manifest = _manifest(saved, base, num_experts - 1, labels[:index] + labels[index + 1:], event,
                             time.perf_counter() - start,
                             {"masked_experts": _remap_masked(saved["moe"].get("masked_experts", ""), index)})
        writer.finish(manifest)
    out(f"[mix] wrote {output} ({num_experts - 1} experts) in {manifest['seconds']:.1f} s")
    return manifest


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str]) -> int:
    """``add`` / ``remove`` (argv without the program name)."""
    parser = argparse.ArgumentParser(prog="python -m btx_jax.mix", description="Add or remove an expert of an MoE "
                                     "checkpoint (see btx_jax/mix/lifecycle.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="append a dense expert (a branch of the MoE's seed) as expert E")
    add.add_argument("--moe", required=True, help="the MoE checkpoint (workdir, checkpoints/, step dir or surgeon output)")
    add.add_argument("--expert", required=True, help="the dense expert's checkpoint")
    add.add_argument("--domain", required=True, help="the new expert's data domain (its router column's centroid)")
    add.add_argument("--output", required=True, help="a new directory")
    add.add_argument("--config", required=True, help="a config whose data section names the domain, e.g. "
                     "configs/btx_demo.py (file.py[:variant])")
    remove = commands.add_parser("remove", help="drop expert I (its FFN and router column) for good")
    remove.add_argument("--moe", required=True)
    remove.add_argument("--expert", required=True, type=int, help="the index I of the expert to remove")
    remove.add_argument("--output", required=True, help="a new directory")
    args = parser.parse_args(argv)
    from btx_jax import compilation_cache, config as config_lib

    compilation_cache.enable()
    try:
        if args.command == "add":
            add_expert(args.moe, args.expert, args.domain, args.output, config_lib.load_config(args.config))
        else:
            remove_expert(args.moe, args.expert, args.output)
    except (MixError, config_lib.ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

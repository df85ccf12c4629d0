"""``python -m btx_jax.recipe --config ... --workdir ... --plan``: what the recipe would run, without running it.

For every stage (btx_jax/graph.py): its command (``recipe --stage=NAME``, what launch/btx.sh runs on
the stage's own slice), mesh and device count, steps, tokens and training FLOPs, memory per
device (btx_jax/memory.py, with a target), the estimated wall-clock at ``recipe.assumed_mfu`` of
the target's peak, and whether it is already done in the workdir. Stages of one *group* need
only earlier groups, so they can run at the same time; the wall-clock of the whole recipe is the
sum over groups of each group's longest stage (every stage on its own slice).
"""
from __future__ import annotations

import json
import logging
import shlex
import sys

import jax

from btx_jax import graph, paths, sharding


def _status(node, done: set[str], workdir) -> str:
    """done / stale (its config or inputs changed) / started (interrupted) / todo. Reads only."""
    if not set(node.inputs) <= done:
        return "todo"  # it cannot be current before its inputs are
    if node.stage.kind == "report":
        return "done" if (paths.resolve(workdir) / "report" / "results.json").exists() else "todo"
    for name in node.stage.inputs:
        node.recipe.store.load(name)
    return node.recipe.store.status(node.stage.name, node.recipe.fields(node.stage), node.stage.inputs)


def build(config, workdir, config_args: list[str]) -> dict:
    """The plan as a dict (the JSON that launch/btx.sh reads; described in the README)."""
    from btx_jax import recipe as recipe_lib  # recipe imports this module

    r = config.recipe
    target = None
    if r.target:
        from btx_jax import hardware, memory
        target = hardware.get(r.target)
    devices = target.devices if target else jax.device_count()
    peak = target.peak_flops * devices if target else None
    nodes = recipe_lib.stage_graph(config, workdir, out=lambda _: None)
    group = graph.groups([(n.name, n.inputs) for n in nodes])
    # on the target, each stage runs from the checkout with its own environment's python
    command = ["python" if target else sys.executable, "-m", "btx_jax.recipe", *config_args, f"--workdir={workdir}"]
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # an unreachable bucket: one line below, not retries' traces
    stages, done, unreadable = [], set(), None
    for node in nodes:
        try:
            status = "unknown" if unreadable else _status(node, done, workdir)
        except Exception as e:  # noqa: BLE001 (a workstation without the bucket's credentials or network)
            unreadable, status = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "unknown"
        if status == "done":
            done.add(node.name)
        c = node.stage.config if node.stage.config is not None else config
        entry = {"name": node.name, "kind": node.stage.kind, "inputs": node.inputs, "group": group[node.name],
                 "command": [*command, f"--stage={node.name}"], "mesh": sharding.mesh_shape(c.mesh, devices),
                 "devices": devices, "steps": 0, "tokens": 0, "flops": 0.0, "estimated_seconds": None,
                 "memory_gb": None, "status": status, "done": status == "done"}
        if node.stage.kind == "train":
            entry.update(graph.compute(c))
            if peak:
                entry["estimated_seconds"] = entry["flops"] / (peak * r.assumed_mfu)
            if target:
                entry["memory_gb"] = {k: v / 1e9 for k, v in memory.stage_memory(c, devices).items()}
        stages.append(entry)
    groups = [[s["name"] for s in stages if s["group"] == g] for g in range(max(group.values()) + 1)]
    return {"config": " ".join(config_args), "workdir": str(workdir), "target": r.target,
            "assumed_mfu": r.assumed_mfu, "peak_flops_per_device": target.peak_flops if target else None,
            "hbm_gb": target.hbm_bytes / 1e9 if target else None, "stages": stages, "groups": groups,
            "estimated_seconds": _wall_clock(stages, groups) if peak else None, "workdir_unreadable": unreadable}


def _wall_clock(stages: list[dict], groups: list[list[str]]) -> float:
    """Every stage on its own slice: the sum over groups of the group's longest stage (surgery and
    evaluation are not estimated: they do no training FLOPs)."""
    seconds = {s["name"]: s["estimated_seconds"] or 0.0 for s in stages}
    return sum(max(seconds[n] for n in names) for names in groups)


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=1)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def to_text(plan: dict) -> str:
    """A table (one stage a row, by group) and the commands."""
    mfu = f", at {plan['assumed_mfu']:.0%} MFU of {plan['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device" \
        if plan["peak_flops_per_device"] else " (no recipe.target: no time or memory estimate)"
    lines = [f"plan for {plan['config']} in {plan['workdir']} on {plan['target'] or 'this host'}{mfu}", ""]
    if plan["workdir_unreadable"]:
        lines[-1:-1] = [f"(the workdir cannot be read from here, so which stages are done is unknown: "
                        f"{plan['workdir_unreadable']})"]
    header = f"{'group':>5}  {'stage':<28} {'status':<8} {'kind':<6} {'mesh (data,fsdp,expert,tensor)':<31} " \
             f"{'steps':>7} {'tokens':>10} {'FLOPs':>9} {'time':>8} {'GB/device':>9}"
    lines += [header, "-" * len(header)]
    for s in sorted(plan["stages"], key=lambda s: s["group"]):
        mesh = ",".join(str(s["mesh"][a]) for a in sharding.MESH_AXES) + f" ({s['devices']})"
        memory = f"{s['memory_gb']['total']:.1f}" if s["memory_gb"] else "-"
        lines.append(f"{s['group']:>5}  {s['name']:<28} {s['status']:<8} {s['kind']:<6} {mesh:<31} {s['steps']:>7,} "
                     f"{s['tokens']:>10.3g} {s['flops']:>9.3g} {_duration(s['estimated_seconds']):>8} {memory:>9}")
    total = sum(s["flops"] for s in plan["stages"])
    lines += ["", f"total training FLOPs {total:.3g}"]
    if plan["estimated_seconds"] is not None:
        serial = sum(s["estimated_seconds"] or 0.0 for s in plan["stages"])
        lines.append(f"estimated wall-clock: {_duration(plan['estimated_seconds'])} with each group's stages at the same "
                     f"time on their own {plan['target']} (one after another: {_duration(serial)})")
    if plan["hbm_gb"]:
        over = [s["name"] for s in plan["stages"] if s["memory_gb"] and s["memory_gb"]["total"] > plan["hbm_gb"]]
        lines.append(f"memory: every stage fits {plan['hbm_gb']:.0f} GB per device" if not over else
                     f"memory: {', '.join(over)} need more than the {plan['hbm_gb']:.0f} GB per device")
    lines += ["", "commands (launch/btx.sh runs each group's stages at the same time, groups in order):"]
    lines += [f"  [{s['group']}] {shlex.join(s['command'])}" + ("  # done" if s["done"] else "")
              for s in sorted(plan["stages"], key=lambda s: s["group"])]
    return "\n".join(lines)


def config_args(argv: list[str]) -> list[str]:
    """The --config flags of this command line, to repeat in each stage's command."""
    args, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config"):
            if "=" not in arg and i + 1 < len(argv):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            args.append(arg)
        i += 1
    return args

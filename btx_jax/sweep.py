"""``--config.recipe.sweep=seed_share:0.3,0.5,0.7,0.9``: the comparison at several compute splits.

The total training budget is fixed: the FLOPs of the config's seed, branch and finetune
steps (``recipe.seed_steps``, ``branch_steps``, ``finetune_steps``). For a seed share s
(``recipe.seed_share``, which the sweep varies) the seed gets s of it; the rest goes to the
branches and the finetune in the config's own proportion; the dense and upcycling baselines get what BTX spends after the
seed, as always. Each point is a full comparison (all trials, intervals) under
``<workdir>/sweep/seed_share_<s>/`` with its own report; ``<workdir>/report/`` gets the sweep
table and ``sweep.png`` (perplexity against seed share, per model, with intervals).
The BTX variants are left out of the sweep points (they do not change the compute split).
"""
from __future__ import annotations

import copy
import json

from btx_jax import config as config_lib, paths, report

KNOBS = ("seed_share",)
SWEPT_MODELS = ("BTX", "dense (compute-matched)", "sparse upcycling", "BTM ensemble")


def parse(spec: str) -> tuple[str, list[float]] | None:
    """'seed_share:0.3,0.5' -> ('seed_share', [0.3, 0.5]); '' -> None."""
    if not spec:
        return None
    knob, _, values = spec.partition(":")
    if knob not in KNOBS or not values:
        raise config_lib.ConfigError("recipe.sweep", f"bad sweep {spec!r}", "use e.g. seed_share:0.3,0.5,0.7,0.9")
    try:
        points = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise config_lib.ConfigError("recipe.sweep", f"bad numbers in {spec!r}", "use e.g. seed_share:0.3,0.5") from None
    if not points or not all(0.0 < p < 1.0 for p in points):
        raise config_lib.ConfigError("recipe.sweep", f"seed shares must be in (0, 1), got {points}",
                                     "use e.g. seed_share:0.3,0.5,0.7,0.9")
    return knob, points


def split_steps(config, seed_share: float) -> dict[str, int]:
    """seed / branch / finetune steps that spend the config's total budget with the seed taking `seed_share`."""
    from btx_jax.recipe import compute, dense_config, moe_config
    r = config.recipe
    dense_step = compute(dense_config(config, 1), 1)["flops"]
    moe_step = compute(moe_config(config, 1, ""), 1)["flops"]
    domains = len(config.data.domains)
    branch_flops = domains * r.branch_steps * dense_step
    finetune_flops = r.finetune_steps * moe_step
    total = r.seed_steps * dense_step + branch_flops + finetune_flops
    rest = (1.0 - seed_share) * total
    branch_part = branch_flops / (branch_flops + finetune_flops)
    return {"seed_steps": max(2, round(seed_share * total / dense_step)),
            "branch_steps": max(2, round(branch_part * rest / (domains * dense_step))),
            "finetune_steps": max(2, round((1 - branch_part) * rest / moe_step))}


def resolve(config):
    """The config with `recipe.seed_share` applied to its steps (a copy; unchanged when the share is 0)."""
    share = config.recipe.seed_share
    if not share:
        return config
    if not 0.0 < share < 1.0:
        raise config_lib.ConfigError("recipe.seed_share", f"must be in (0, 1) or 0 (off), got {share}",
                                     "use e.g. 0.7: the seed gets 70% of the training budget")
    c = copy.deepcopy(config)
    c.recipe.update(seed_share=0.0, **split_steps(config, share))
    return c


def point_config(config, seed_share: float):
    """One sweep point: the budget re-split at `seed_share`, without the variants."""
    c = copy.deepcopy(config)
    c.recipe.update(sweep="", variants="", seed_share=seed_share)
    return resolve(c)


def run(config, workdir: str, compare, out=print) -> dict:
    """Runs the comparison at every point; writes each point's report and the sweep report."""
    knob, points = parse(config.recipe.sweep)
    sweep = {"knob": knob, "points": []}
    for value in points:
        c = point_config(config, value)
        point_dir = str(paths.resolve(workdir) / "sweep" / f"{knob}_{value:g}")
        r = c.recipe
        out(f"[recipe] sweep {knob}={value:g}: seed {r.seed_steps}, branches {r.branch_steps} each, "
            f"finetune {r.finetune_steps} steps -> {point_dir}")
        results = compare(c, point_dir, out)
        report.write(paths.resolve(point_dir) / "report", results, point_dir, out=out)
        sweep["points"].append({"value": value, "steps": {k: r[k] for k in ("seed_steps", "branch_steps", "finetune_steps")},
                                "results": results})
    report_dir = paths.resolve(workdir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "sweep.json").write_text(json.dumps(sweep, indent=1))
    report.write_sweep(report_dir, sweep, SWEPT_MODELS, out=out)
    return sweep

"""The seed-share sweep: the budget split by hand, bad specs, and the sweep report from fake results."""
import json
import os

import numpy as np
import pytest

from btx_jax import recipe, sweep
from btx_jax.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo():
    return load_config(os.path.join(REPO, "configs/btx_demo.py"))


@pytest.mark.parametrize("share", [0.3, 0.5, 0.9])
def test_every_point_spends_the_same_total_budget(share):
    config = demo()
    dense = recipe.compute(recipe.dense_config(config, 1), 1)["flops"]
    moe = recipe.compute(recipe.moe_config(config, 1, ""), 1)["flops"]
    r = config.recipe
    total = (r.seed_steps + 3 * r.branch_steps) * dense + r.finetune_steps * moe
    steps = sweep.split_steps(config, share)
    spent = (steps["seed_steps"] + 3 * steps["branch_steps"]) * dense + steps["finetune_steps"] * moe
    assert spent == pytest.approx(total, abs=3 * dense + moe)  # rounding: at most one step of each stage
    assert steps["seed_steps"] * dense == pytest.approx(share * total, abs=dense)
    # branches : finetune keep the config's proportion
    ratio = 3 * r.branch_steps * dense / (r.finetune_steps * moe)
    assert 3 * steps["branch_steps"] * dense / (steps["finetune_steps"] * moe) == pytest.approx(ratio, rel=0.1)


@pytest.mark.parametrize("spec", ["seed_share:", "seed_share:1.2", "seed_share:a,b", "lr:0.1", "seed_share:0"])
def test_bad_sweep_specs_are_refused(spec):
    with pytest.raises(ConfigError, match="recipe.sweep"):
        sweep.parse(spec)


def test_sweep_runs_each_point_and_writes_the_sweep_report(tmp_path):
    """With a stand-in for the comparison: each point's config, its report, and sweep.md / sweep.png."""
    config = demo()
    config.recipe.sweep = "seed_share:0.4,0.8"
    seen = []

    def fake_compare(c, workdir, out):
        seen.append((c.recipe.seed_steps, c.recipe.branch_steps, c.recipe.finetune_steps, c.recipe.variants, workdir))
        share = c.recipe.seed_steps / 1000
        models = []
        for i, name in enumerate(["BTX", "dense (compute-matched)", "sparse upcycling", "BTM ensemble"]):
            ppl = {d: 5.0 + i - share for d in ("code", "math", "prose", "docs")}
            models.append({"model": name, "ppl": ppl, "interval": {d: (p - 0.1, p + 0.1) for d, p in ppl.items()},
                           "avg_ppl": 5.0 + i - share, "avg_interval": (4.9 + i - share, 5.1 + i - share),
                           "flops": 1e12, "tokens": 1000, "stages": []})
        return {"domains": ["code", "math", "prose", "docs"], "train_domains": ["code", "math", "prose"],
                "models": models, "best": {"avg": "BTX"}, "routing": {}, "trials": 1, "bootstrap": 100,
                "tokens_scored": {d: 100 for d in ("code", "math", "prose", "docs")},
                "documents": {d: 10 for d in ("code", "math", "prose", "docs")}, "calibration_tokens": 10, "stages": {}}

    result = sweep.run(config, str(tmp_path), fake_compare, out=lambda _: None)
    assert [s[:3] for s in seen] == [tuple(sweep.split_steps(config, v).values()) for v in (0.4, 0.8)]
    assert all(s[3] == "" for s in seen)  # no variants in sweep points
    assert [s[4] for s in seen] == [str(tmp_path / "sweep" / f"seed_share_{v}") for v in ("0.4", "0.8")]
    for v in ("0.4", "0.8"):
        assert (tmp_path / "sweep" / f"seed_share_{v}" / "report" / "results.md").exists()
    table = (tmp_path / "report" / "sweep.md").read_text()
    assert table.count("| BTX |") == 2 and "**" in table
    assert os.path.getsize(tmp_path / "report" / "sweep.png") > 0
    saved = json.loads((tmp_path / "report" / "sweep.json").read_text())
    assert [p["value"] for p in saved["points"]] == [0.4, 0.8] == [p["value"] for p in result["points"]]
    assert np.isclose(saved["points"][1]["results"]["models"][0]["avg_ppl"], 5.0 - seen[1][0] / 1000)


def test_seed_share_resplits_the_budget_and_matches_the_sweep_point():
    """The demo's default (seed_share 0.7) is the sweep's 0.7 point, so their stages are the same runs."""
    config = demo()
    resolved = sweep.resolve(config)
    point = sweep.point_config(config, 0.7)
    keys = ("seed_steps", "branch_steps", "finetune_steps")
    expected = list(sweep.split_steps(config, 0.7).values())
    assert [resolved.recipe[k] for k in keys] == [point.recipe[k] for k in keys] == expected
    assert resolved.recipe.seed_share == 0.0 and config.recipe.seed_share == 0.7  # the input is not changed
    config.recipe.seed_share = 1.5
    with pytest.raises(ConfigError, match="recipe.seed_share"):
        sweep.resolve(config)

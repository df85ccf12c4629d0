"""The BTX recipe end to end on the tiny demo config: every stage, the report, skip/resume, compute."""
import json
import os
import shutil

import pytest

from btx_jax import recipe
from btx_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(data_dir):
    config = load_config(os.path.join(REPO, "configs/btx_demo.py:tiny"))
    config.data.data_dir = data_dir
    config.train.peak_flops = 1e11
    return config


@pytest.fixture(scope="module")
def finished(demo_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("btx")
    lines = []
    results = recipe.run(tiny(demo_data_dir), str(workdir), out=lines.append)
    return workdir, results, lines


def test_every_stage_runs_and_the_report_is_written(finished):
    workdir, results, _ = finished
    stages = ["seed", "branch/code", "branch/math", "branch/prose", "mix", "finetune", "baseline/dense",
              "baseline/upcycle_mix", "baseline/upcycle", "variant/top1", "variant/no_load_balance",
              "variant/random_router_mix", "variant/random_router"]
    for stage in stages:
        assert os.path.exists(workdir / stage / "stage.json"), stage
    names = [r["model"] for r in results["models"]]
    assert names == ["seed", "expert:code", "expert:math", "expert:prose", "BTX", "dense (compute-matched)",
                     "sparse upcycling", "BTX top1", "BTX no load balance", "BTX random router", "BTM ensemble",
                     "sample-level routing (top-1 expert)", "BTM uniform average", "BTM posterior average"]
    for name in ("results.md", "results.csv", "results.json", "loss_curves.png", "routing.png", "expert_usage.png",
                 "ppl_vs_compute.png"):
        assert os.path.getsize(workdir / "report" / name) > 0, name
    assert os.listdir(workdir / "report" / "tensorboard")
    table = (workdir / "report" / "results.md").read_text()
    assert "| BTX |" in table and "**" in table
    routing = results["routing"]
    assert results["domains"] == ["code", "math", "prose", "docs"]  # docs: out of domain, never trained on
    assert set(routing) == {"code", "math", "prose", "docs"} and [len(u) for u in routing["code"]] == [4, 4]  # 2 layers x 4 experts
    for model in results["models"]:
        assert all(1.0 < p < 400 for p in model["ppl"].values())


def test_baselines_get_btx_compute(finished):
    """The dense and upcycling baselines spend (to one step) what BTX spends after the seed."""
    workdir, results, _ = finished
    stage = {s: json.load(open(workdir / s / "stage.json")) for s in
             ["finetune", "baseline/dense", "baseline/upcycle", "branch/code", "branch/math", "branch/prose"]}
    btx_after_seed = sum(stage[f"branch/{d}"]["flops"] for d in ("code", "math", "prose")) + stage["finetune"]["flops"]
    for baseline in ("baseline/dense", "baseline/upcycle"):
        per_step = stage[baseline]["flops"] / stage[baseline]["steps"]
        assert abs(stage[baseline]["flops"] - btx_after_seed) <= per_step / 2 + 1


def test_compute_accounting_matches_a_hand_count(demo_data_dir):
    config = tiny(demo_data_dir)
    m = config.model  # d 64, 2 layers, 4 heads x 16, 2 kv heads, mlp 128, vocab 384; seq 64, batch 8
    attn = 64 * 16 * (2 * 4 + 2 * 2)
    ffn = 3 * 64 * 128
    tokens = 6 * 8 * 64
    dense_n = 2 * (attn + ffn) + 64 * 384
    attention = 6 * 2 * 4 * 16 * 64
    got = recipe.compute(recipe.dense_config(config, 6))
    assert got == {"steps": 6, "tokens": tokens, "flops": (6 * dense_n + attention) * tokens}
    moe_n = dense_n + 2 * (ffn + 64 * 4)  # top-2: one more FFN per layer, plus the router (D x E)
    assert recipe.compute(recipe.moe_config(config, 6, ""))["flops"] == (6 * moe_n + attention) * tokens
    assert m.num_layers == 2


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(finished, demo_data_dir):
    """Without its stage.json and last checkpoint, the seed resumes from step 4; everything else is skipped."""
    workdir, _, _ = finished
    os.remove(workdir / "seed" / "stage.json")
    shutil.rmtree(workdir / "seed" / "checkpoints" / "6")
    lines = []
    recipe.run(tiny(demo_data_dir), str(workdir), out=lines.append)
    text = "\n".join(lines)
    assert "seed: training 6 steps" in text
    for stage in ("branch/code", "mix", "finetune", "baseline/dense", "variant/random_router"):
        assert f"{stage}: done, skipping" in text
    assert json.load(open(workdir / "seed" / "stage.json"))["steps"] == 6
    assert os.path.isdir(workdir / "seed" / "checkpoints" / "6")


def test_parallel_branches_run_as_processes(finished, demo_data_dir, tmp_path):
    """recipe.parallel_branches: each branch is its own `btx_jax.train` process, started from the seed."""
    workdir, _, _ = finished
    shutil.copytree(workdir / "seed", tmp_path / "seed")
    config = tiny(demo_data_dir)
    config.recipe.parallel_branches = True
    lines = []
    run = recipe.Recipe(config, str(tmp_path), out=lines.append)
    run.records["seed"] = json.load(open(tmp_path / "seed" / "stage.json"))
    run.branches()
    text = "\n".join(lines)
    for domain in ("code", "math", "prose"):
        assert f"branch/{domain}: started as a process" in text
        log = (tmp_path / "branch" / domain / "train.log").read_text()
        assert "initialising params from" in log and "done: 3 steps" in log
        assert json.load(open(tmp_path / "branch" / domain / "stage.json"))["steps"] == 3

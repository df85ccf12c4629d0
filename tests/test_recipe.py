"""The BTX recipe end to end on the tiny demo config: every stage, the report, skip/resume, compute."""
import json
import os
import shutil

import numpy as np
import pytest

from btx_jax import plan, recipe
from helpers import tiny_recipe_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every test here on one xdist worker (make test runs --dist loadgroup), so the recipe run that most of
# them share (`finished`) is built once, not once per worker
pytestmark = pytest.mark.xdist_group("recipe")


tiny = tiny_recipe_config


@pytest.fixture(scope="module")
def finished(tiny_recipe_run):
    _, workdir, results, lines = tiny_recipe_run
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
                 "ppl_vs_compute.png", "scores.npz"):
        assert os.path.getsize(workdir / "report" / name) > 0, name
    assert os.listdir(workdir / "report" / "tensorboard")
    for name in ("routing_btx_top1.png", "routing_btx_no_load_balance.png", "routing_btx_random_router.png",
                 "routing_sparse_upcycling.png"):  # a routing heatmap for every MoE model, not only BTX
        assert os.path.getsize(workdir / "report" / name) > 0, name
    assert set(results["routing_by_model"]) >= {"BTX", "BTX top1", "sparse upcycling"}
    table = (workdir / "report" / "results.md").read_text()
    assert "| BTX |" in table and " ±" in table and "95% paired-bootstrap interval" in table
    routing = results["routing"]
    assert results["domains"] == ["code", "math", "prose", "docs"]  # docs: out of domain, never trained on
    assert set(routing) == {"code", "math", "prose", "docs"} and [len(u) for u in routing["code"]] == [4, 4]  # 2 layers x 4 experts
    for model in results["models"]:
        assert all(1.0 < p < 400 for p in model["ppl"].values())
        for d, (low, high) in model["interval"].items():
            assert low <= model["ppl"][d] * 1.001 and high >= model["ppl"][d] * 0.999
    assert results["best"]["avg"] in (None, *names)


def test_eval_scores_the_token_budget_of_every_domain_without_drops(finished):
    """At least recipe.eval_tokens targets per domain (or the whole split), stated in the report; MoE
    models are evaluated dropless and their drop fractions are reported."""
    workdir, results, _ = finished
    budget = tiny("unused").recipe.eval_tokens
    for domain, tokens in results["tokens_scored"].items():
        assert tokens >= budget, domain
    table = (workdir / "report" / "results.md").read_text()
    assert all(f"{d} {results['tokens_scored'][d]:,} tokens" in table for d in results["domains"])
    rows = {r["model"]: r for r in results["models"]}
    for name in ("BTX", "sparse upcycling", "BTX top1"):
        assert rows[name]["drop"] == {"train": 0.0, "eval": 0.0}  # the demo's MoE stages are dropless
    assert "drop" not in rows["seed"]
    assert "0.0% / 0.0%" in table


def test_eval_never_drops_even_when_training_used_capacity(demo_data_dir, tmp_path):
    config = tiny(demo_data_dir)
    config.moe.update(dispatcher="einsum", train_capacity_factor=0.5)
    run = recipe.Recipe(config, str(tmp_path))
    for name in ("finetune", "baseline/upcycle", "variant/top1"):
        run.store.records[name] = {}
    moe_models = [m for m in run.models() if m["config"].moe.num_experts]
    assert len(moe_models) == 3 and all(m["config"].moe.dispatcher == "dropless" for m in moe_models)


def test_train_drop_fraction_reads_the_stage_metrics(tmp_path):
    from btx_jax.compare import train_drop_fraction
    from btx_jax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.scalars(1, {"loss": 1.0})
    writer.close()
    assert train_drop_fraction(str(tmp_path)) is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "moe/dropped_fraction": [0.1, 0.3]}) + "\n")
        f.write(json.dumps({"step": 3, "moe/dropped_fraction": [0.0, 0.2]}) + "\n")
    assert abs(train_drop_fraction(str(tmp_path)) - 0.15) < 1e-9


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


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(finished, demo_data_dir, tmp_path):
    """Without its stage.json and last checkpoint, baseline/dense resumes from step 12; the rest is skipped."""
    workdir = tmp_path / "btx"
    shutil.copytree(finished[0], workdir)
    os.remove(workdir / "baseline" / "dense" / "stage.json")
    shutil.rmtree(workdir / "baseline" / "dense" / "checkpoints" / "13")
    lines = []
    recipe.Recipe(tiny(demo_data_dir), str(workdir), out=lines.append).run()
    text = "\n".join(lines)
    assert "baseline/dense: training 13 steps" in text and "re-running" not in text
    for stage in ("seed", "branch/code", "mix", "finetune", "baseline/upcycle", "variant/random_router"):
        assert f"{stage}: done, skipping" in text
    assert json.load(open(workdir / "baseline" / "dense" / "stage.json"))["steps"] == 13
    assert os.path.isdir(workdir / "baseline" / "dense" / "checkpoints" / "13")


def test_a_changed_stage_reruns_with_everything_downstream(finished, demo_data_dir, tmp_path):
    """stage.json records a fingerprint of the stage's config and inputs: a changed finetune re-runs (the
    old run kept aside), the stages before it are reused; recipe.rerun_from forces a stage and what follows."""
    workdir = tmp_path / "btx"
    shutil.copytree(finished[0], workdir)
    config = tiny(demo_data_dir)
    config.recipe.update(finetune_steps=4, baselines="", variants="")
    lines = []
    recipe.Recipe(config, str(workdir), out=lines.append).run()
    text = "\n".join(lines)
    for stage in ("seed", "branch/code", "branch/math", "branch/prose", "mix"):
        assert f"{stage}: done, skipping" in text
    assert "finetune: re-running because config changed (train.steps: 3 -> 4)" in text
    assert json.load(open(workdir / "finetune" / "stage.json"))["steps"] == 4
    assert json.load(open(workdir / "finetune.previous" / "stage.json"))["steps"] == 3

    config.recipe.rerun_from = "mix"
    lines = []
    recipe.Recipe(config, str(workdir), out=lines.append).run()
    text = "\n".join(lines)
    assert "mix: re-running because recipe.rerun_from asks for it" in text
    assert "finetune: re-running because its inputs re-ran (mix)" in text
    assert "seed: done, skipping" in text


def test_an_interrupted_stage_does_not_resume_under_another_config(finished, demo_data_dir, tmp_path):
    """The finetune was interrupted after its last checkpoint; with another lr it starts afresh instead of resuming."""
    workdir = tmp_path / "btx"
    shutil.copytree(finished[0], workdir)
    os.remove(workdir / "finetune" / "stage.json")
    config = tiny(demo_data_dir)
    config.recipe.update(baselines="", variants="", finetune_lr=5e-4)
    lines = []
    recipe.Recipe(config, str(workdir), out=lines.append).run()
    text = "\n".join(lines)
    assert "finetune: re-running because its interrupted run config changed (optim.lr: 0.001 -> 0.0005)" in text
    assert "seed: done, skipping" in text and "mix: done, skipping" in text
    assert not os.path.exists(workdir / "finetune.previous" / "stage.json")
    assert json.load(open(workdir / "finetune" / "stage.json"))["config"]["optim.lr"] == 5e-4


def test_btm_weights_are_fitted_on_training_data_not_on_the_eval_set(finished, demo_data_dir):
    """The posterior-average weights depend on the calibration set (training split) only."""
    from btx_jax import compare, evaluate

    workdir, results, _ = finished
    config = tiny(demo_data_dir)
    run = recipe.Recipe(config, str(workdir), out=lambda _: None)
    run.run()
    calibration = evaluate.load_eval_sets(config, max_tokens=config.recipe.calibration_tokens, split="train")
    full = evaluate.load_eval_sets(config, max_tokens=config.recipe.eval_tokens)
    half = {d: b[:1] for d, b in full.items()}
    scorer = compare.Scorer()
    rows = [compare.btm_rows(run, e, calibration, scorer, out=lambda _: None) for e in (full, half)]
    priors = [r["BTM posterior average"]["priors"] for r in rows]
    assert priors[0] == priors[1]
    # computed here from the branches, the ensemble equals the recipe's (built from the expert rows' scores)
    ensemble = {r["model"]: r for r in results["models"]}["BTM ensemble"]
    for d in results["domains"]:
        np.testing.assert_allclose(rows[0]["BTM ensemble"]["scores"][d].ppl, ensemble["ppl"][d], rtol=1e-6)
    row = {r["model"]: r for r in results["models"]}["BTM posterior average"]
    np.testing.assert_allclose([row["priors"][d] for d in results["domains"]],
                               [priors[0][d] for d in results["domains"]], rtol=1e-6)


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


@pytest.mark.parametrize("field,value,match", [
    ("seeds", 0, "recipe.seeds"), ("bootstrap", 10, "recipe.bootstrap"), ("eval_tokens", -1, "recipe.eval_tokens"),
    ("rerun_from", "seeed", "recipe.rerun_from"), ("sweep", "seed_share:2", "recipe.sweep")])
def test_bad_recipe_fields_are_refused_before_any_work(field, value, match, tmp_path):
    config = tiny(str(tmp_path / "no_data"))
    config.recipe[field] = value
    with pytest.raises(recipe.config_lib.ConfigError, match=match):
        recipe.run(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")


def test_calibration_skips_a_domain_without_training_split(monkeypatch):
    """A held-out-only domain with no training split gets no calibration set (uniform BTM weights), with a message."""
    from btx_jax import evaluate
    from btx_jax.data.datasets import DataError

    def fake_load(config, *, max_tokens=None, split="eval", names=None, num_batches=None):
        if names == ["docs"]:
            raise DataError("dataset x has splits ['test'], none of ['train']")
        return {names[0]: [f"{names[0]}-batch"]}

    monkeypatch.setattr(evaluate, "load_eval_sets", fake_load)
    lines = []
    sets = recipe.calibration_sets(tiny("unused"), ["code", "docs"], out=lines.append)
    assert sets == {"code": ["code-batch"]}
    assert "docs: no training split" in lines[0] and "uniform weights" in lines[0]


def test_a_config_field_added_later_at_its_default_does_not_rerun_a_stage(tmp_path):
    """A record written before a schema field existed stays valid while that field is at its default;
    any other difference still re-runs the stage."""
    from btx_jax.stages import StageStore, relevant_config

    config = tiny("unused")
    fields = relevant_config(config, ("model", "train"))
    store = StageStore(str(tmp_path), out=lambda *_: None)
    assert store.begin("seed", fields, []) is None
    store.finish("seed", {"flops": 1.0})
    record = json.loads((tmp_path / "seed" / "stage.json").read_text())
    del record["config"]["model.rope_scaling"]  # as written before the field existed
    record["fingerprint"] = "older"
    (tmp_path / "seed" / "stage.json").write_text(json.dumps(record))
    lines = []
    assert StageStore(str(tmp_path), out=lines.append).begin("seed", fields, []) is not None
    assert "recorded before model.rope_scaling existed" in lines[0]
    record["config"]["model.d_model"] = 999  # a real change: re-run
    record["fingerprint"] = "older"
    del record["config"]["model.rope_factor"]
    (tmp_path / "seed" / "stage.json").write_text(json.dumps(record))
    assert StageStore(str(tmp_path), out=lambda *_: None).begin("seed", fields, []) is None
    assert os.path.exists(tmp_path / "seed.previous" / "stage.json")


def test_execution_settings_do_not_rerun_a_stage(tmp_path):
    """Loop unrolling, remat and the CPU grouped matmul's blocks change speed and memory, not the numbers:
    changing them keeps a finished stage (also one recorded when they were still fingerprinted)."""
    from btx_jax.stages import StageStore, relevant_config

    config = tiny("unused")
    store = StageStore(str(tmp_path), out=lambda *_: None)
    assert store.begin("seed", relevant_config(config, ("model", "moe")), []) is None
    store.finish("seed", {"flops": 1.0})
    record = json.loads((tmp_path / "seed" / "stage.json").read_text())
    record["config"].update({"model.scan_unroll": 1, "moe.grouped_block": 128})  # as fingerprinted before
    record["fingerprint"] = "older"
    (tmp_path / "seed" / "stage.json").write_text(json.dumps(record))
    config.model.update(remat="full", scan_unroll=2)
    config.moe.update(grouped_impl="native", grouped_block=64)
    fields = relevant_config(config, ("model", "moe"))
    assert not any(k in fields for k in ("model.remat", "model.scan_unroll", "moe.grouped_impl", "moe.grouped_block"))
    assert StageStore(str(tmp_path), out=lambda *_: None).status("seed", fields, []) == "done"
    lines = []
    assert StageStore(str(tmp_path), out=lines.append).begin("seed", fields, []) is not None
    assert "change only speed or memory" in lines[0]
    assert not os.path.exists(tmp_path / "seed.previous")


# ------------------------------------------------------------------------------ --plan and --stage

def _plan(config, workdir):
    return plan.build(config, str(workdir), ["--config=configs/btx_demo.py:tiny"])


def test_plan_lists_every_stage_in_dependency_groups_with_its_compute(demo_data_dir, tmp_path):
    """A fresh workdir: every stage todo, inputs in earlier groups, the branches together, the report last;
    FLOPs are the stage configs' (the numbers the report uses); each command runs one stage."""
    config = tiny(demo_data_dir)
    p = _plan(config, tmp_path)
    stages = {s["name"]: s for s in p["stages"]}
    assert p["groups"][0] == ["seed"] and p["groups"][-1] == ["report"]
    assert {"branch/code", "branch/math", "branch/prose"} <= set(p["groups"][1])
    for s in p["stages"]:
        assert s["status"] == "todo" and not s["done"]
        assert all(stages[i]["group"] < s["group"] for i in s["inputs"])
        assert s["command"][-1] == f"--stage={s['name']}" and f"--workdir={tmp_path}" in s["command"]
    graph = {s.name: s for s in recipe.Recipe(config, str(tmp_path)).stages()}
    assert stages["finetune"]["flops"] == recipe.compute(graph["finetune"].config)["flops"] > 0
    assert stages["mix"]["flops"] == 0 and stages["mix"]["inputs"] == ["seed", "branch/code", "branch/math",
                                                                       "branch/prose"]
    assert p["estimated_seconds"] is None  # no recipe.target: no estimate
    text = plan.to_text(p)
    assert "branch/code" in text and "--stage=report" in text


def test_a_stage_alone_needs_its_inputs_finished(demo_data_dir, tmp_path):
    with pytest.raises(recipe.StageNotReady, match="needs stage seed finished first"):
        recipe.run_stage(tiny(demo_data_dir), str(tmp_path), "mix")
    with pytest.raises(recipe.config_lib.ConfigError, match="not a stage of this config"):
        recipe.run_stage(tiny(demo_data_dir), str(tmp_path), "branch/poetry")


def test_stages_run_one_at_a_time_as_the_launch_driver_runs_them(finished, demo_data_dir, tmp_path):
    """The plan of the finished run says every stage (and the report) is done; a workdir holding only the
    seed runs `--stage=branch/code` alone, and the plan then shows it done and the mix still waiting."""
    workdir, _, _ = finished
    assert all(s["done"] for s in _plan(tiny(demo_data_dir), workdir)["stages"])
    shutil.copytree(workdir / "seed", tmp_path / "seed")
    lines = []
    recipe.run_stage(tiny(demo_data_dir), str(tmp_path), "branch/code", out=lines.append)
    assert "branch/code: training 3 steps" in "\n".join(lines)
    status = {s["name"]: s["status"] for s in _plan(tiny(demo_data_dir), tmp_path)["stages"]}
    assert status["seed"] == status["branch/code"] == "done"
    assert status["branch/math"] == status["mix"] == status["report"] == "todo"
    lines = []
    recipe.run_stage(tiny(demo_data_dir), str(tmp_path), "branch/code", out=lines.append)
    assert "branch/code: done, skipping" in "\n".join(lines)

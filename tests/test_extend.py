"""The expert lifecycle after the merge (btx_jax/mix/lifecycle.py): adding a dense expert to an MoE checkpoint
and removing one, against numpy and against moe.masked_experts; the CLI; bad input; and the recipe's extend
stages (a fourth domain's expert added to the finetuned BTX) on the tiny demo."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from btx_jax import checkpoint, mix, recipe, steps
from btx_jax.config import ConfigError, load_config
from btx_jax.mix import lifecycle
from btx_jax.mix.plan import MixError
from btx_jax.state import make_setup
from helpers import mesh_of, random_batch, subprocess_env, tiny_config
from test_mix import dense_params, mix_config, perturbed, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 4  # three branches + the seed's FFN
FFN = ("gate", "up", "down")
ROUTER = "layers/moe/router/kernel"


def leaves(path) -> dict[str, np.ndarray]:
    """Every param of a checkpoint as numpy."""
    return {name: checkpoint.read_param(str(path), name, shape, dtype)
            for name, (shape, dtype) in checkpoint.param_metadata(str(path)).items()}


def data_config(data_dir):
    """The config whose data section gives the new domain's centroid (docs: held out, like the demo's)."""
    c = mix_config(pathlib.Path("."), "")
    c.data.data_dir = data_dir
    c.data.eval_domains.docs = "demo:docs"
    c.mix.centroid_batches = 1
    return c


@pytest.fixture(scope="module")
def made(tmp_path_factory, demo_data_dir):
    """A merged 4-expert MoE (normal router), a fifth dense branch of its seed, and the MoE with it added."""
    root = tmp_path_factory.mktemp("extend")
    seed = dense_params(tiny_config())
    write_checkpoint(root / "seed", seed)
    for i in range(3):
        write_checkpoint(root / f"expert{i}", perturbed(seed, i + 1))
    newcomer = perturbed(seed, 9)
    write_checkpoint(root / "docs", newcomer)
    mix.run(mix_config(root, root / "moe", router_init="normal"), out=lambda *a: None)
    lines = []
    manifest = lifecycle.add_expert(str(root / "moe"), str(root / "docs"), "docs", str(root / "added"),
                                    data_config(demo_data_dir), out=lines.append)
    return root, newcomer, manifest, lines


def test_add_appends_the_dense_ffn_and_copies_everything_else(made):
    root, newcomer, manifest, lines = made
    before, after = leaves(root / "moe"), leaves(root / "added")
    assert set(before) == set(after)
    for name, old in before.items():
        new = after[name]
        if name == ROUTER:
            assert new.shape == (*old.shape[:2], E + 1)
            np.testing.assert_array_equal(new[:, :, :E], old)  # bit-identical
            column = new[:, :, E]
            norms, others = np.linalg.norm(column, axis=1), np.linalg.norm(old, axis=1).mean(axis=1)
            np.testing.assert_allclose(norms, others, rtol=1e-5)  # scaled like the existing columns
            assert not np.allclose(column[0], column[1])  # one centroid per layer
        elif name.startswith("layers/moe/experts/"):
            assert new.shape == (old.shape[0], E + 1, *old.shape[2:])
            np.testing.assert_array_equal(new[:, :E], old)
            ffn = name.split("/")[3]
            np.testing.assert_array_equal(new[:, E], newcomer["layers"]["mlp"][ffn]["kernel"])
        else:
            np.testing.assert_array_equal(new, old)
    assert manifest["num_experts"] == E + 1 and manifest["moe"]["num_experts"] == E + 1
    assert manifest["expert_labels"] == ["expert0", "expert1", "expert2", "seed", "docs"]
    assert manifest["history"][-1]["op"] == "add" and manifest["history"][-1]["branch_distance"] < 1.0
    saved = json.loads((root / "added" / "manifest.json").read_text())
    assert checkpoint.saved_model_config(str(root / "added"))["moe"]["num_experts"] == E + 1 and saved["history"]
    assert not any("warning" in line for line in lines)


def test_add_then_remove_is_the_original(made, tmp_path):
    root, _, _, _ = made
    manifest = lifecycle.remove_expert(str(root / "added"), E, str(tmp_path / "back"), out=lambda *a: None)
    assert manifest["num_experts"] == E and manifest["expert_labels"] == ["expert0", "expert1", "expert2", "seed"]
    assert [h["op"] for h in manifest["history"]] == ["add", "remove"]
    before, back = leaves(root / "moe"), leaves(tmp_path / "back")
    assert set(before) == set(back)
    for name in before:
        np.testing.assert_array_equal(back[name], before[name], err_msg=name)


@pytest.mark.parametrize("index", [0, 2])
def test_removing_equals_masking(made, tmp_path, index):
    """The checkpoint without expert I gives the logits of the original with moe.masked_experts=I."""
    root, _, _, _ = made
    lifecycle.remove_expert(str(root / "moe"), index, str(tmp_path / "removed"), out=lambda *a: None)
    removed = leaves(tmp_path / "removed")
    assert removed[ROUTER].shape[2] == E - 1
    mesh = mesh_of(jax.devices()[:1])

    def logits(num_experts, masked, path):
        c = mix_config(pathlib.Path("."), "")
        c.moe.update(num_experts=num_experts, masked_experts=masked, dispatcher="dropless")
        setup = make_setup(c, mesh)
        params = checkpoint.load_params(str(path), setup.abstract_params)
        fn = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b)[0]), mesh)
        return np.asarray(fn(params, random_batch(c))), random_batch(c)["segment_ids"] != 0

    masked, real = logits(E, str(index), root / "moe")
    sliced, _ = logits(E - 1, "", tmp_path / "removed")
    np.testing.assert_allclose(sliced[real], masked[real], rtol=1e-5, atol=1e-5)
    # the masked-experts list follows the renumbering
    assert lifecycle._remap_masked("0,2,3", 2) == "0,2" and lifecycle._remap_masked("", 0) == ""


def test_bad_input_is_refused_and_nothing_written(made, tmp_path, demo_data_dir):
    root, _, _, _ = made
    config = data_config(demo_data_dir)
    out = tmp_path / "out"
    # a dense expert of another shape (mlp_dim 96, not 128)
    write_checkpoint(tmp_path / "wide", dense_params(tiny_config(mlp_dim=96)))
    with pytest.raises(MixError, match=r"does not fit the MoE's architecture(.|\n)*layers/moe/experts/gate/kernel"):
        lifecycle.add_expert(str(root / "moe"), str(tmp_path / "wide"), "docs", str(out), config)
    with pytest.raises(MixError, match="not a data domain"):
        lifecycle.add_expert(str(root / "moe"), str(root / "docs"), "poetry", str(out), config)
    with pytest.raises(MixError, match="is an MoE checkpoint"):
        lifecycle.add_expert(str(root / "moe"), str(root / "added"), "docs", str(out), config)
    with pytest.raises(MixError, match="not an MoE checkpoint"):
        lifecycle.remove_expert(str(root / "seed"), 0, str(out))
    for index in (E, -1):
        with pytest.raises(MixError, match=r"no such expert \(the MoE has 4: 0\.\.3\)"):
            lifecycle.remove_expert(str(root / "moe"), index, str(out))
    with pytest.raises(MixError, match="already exists"):
        lifecycle.remove_expert(str(root / "moe"), 0, str(root / "added"))
    with pytest.raises(MixError, match="already exists"):
        lifecycle.add_expert(str(root / "moe"), str(root / "docs"), "docs", str(root / "added"), config)
    with pytest.raises(MixError, match="not found"):
        lifecycle.remove_expert(str(tmp_path / "nowhere"), 0, str(out))
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_independent_dense_model_is_added_with_a_warning(made, tmp_path, demo_data_dir):
    root, _, _, _ = made
    write_checkpoint(tmp_path / "stranger", dense_params(tiny_config(), seed=5))
    lines = []
    manifest = lifecycle.add_expert(str(root / "moe"), str(tmp_path / "stranger"), "docs", str(tmp_path / "out"),
                                    data_config(demo_data_dir), out=lines.append)
    assert manifest["history"][-1]["branch_distance"] > 1.0
    assert any("warning" in line and "branch of that seed" in line for line in lines)


def test_cli(made, tmp_path):
    root, _, _, _ = made
    env = subprocess_env()
    ok = subprocess.run([sys.executable, "-m", "btx_jax.mix", "remove", "--moe", str(root / "added"), "--expert", "4",
                         "--output", str(tmp_path / "back")], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert checkpoint.saved_model_config(str(tmp_path / "back"))["moe"]["num_experts"] == E
    bad = subprocess.run([sys.executable, "-m", "btx_jax.mix", "remove", "--moe", str(root / "added"), "--expert", "7",
                          "--output", str(tmp_path / "other")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error: --expert 7: no such expert" in bad.stderr


# ------------------------------------------------------------------------------- the recipe's extend stages

def tiny(data_dir, **recipe_overrides):
    config = load_config(os.path.join(REPO, "configs/btx_demo.py:tiny"))
    config.data.data_dir = data_dir
    config.train.peak_flops = 1e11
    config.recipe.update(baselines="", variants="", opt_out=False, extend_domain="docs", extend_branch_steps=20,
                         extend_steps=10)
    config.recipe.update(**recipe_overrides)
    return config


def test_extend_config_is_checked(demo_data_dir):
    for overrides, field in ((dict(extend_domain="code"), "recipe.extend_domain"),
                             (dict(extend_steps=0), "recipe.extend_steps"),
                             (dict(extend_branch_steps=-1), "recipe.extend_branch_steps"),
                             (dict(extend_trainable="("), "recipe.extend_trainable")):
        with pytest.raises(ConfigError, match=field):
            recipe.check(tiny(demo_data_dir, **overrides), check_paths=False)


@pytest.mark.xdist_group("recipe")  # with the shared tiny recipe run it starts from
def test_recipe_adds_a_fourth_domain_expert(tiny_recipe_run, demo_data_dir, tmp_path):
    """The extend/* stages on a copy of the shared tiny recipe run (conftest.py): its config differs only in
    recipe.* fields that no BTX stage depends on, so seed, branches, mix and finetune are done and skipped."""
    workdir = tmp_path / "btx"
    shutil.copytree(tiny_recipe_run[1], workdir)
    lines = []
    results = recipe.run(tiny(demo_data_dir), str(workdir), out=lines.append)
    assert "finetune: done, skipping" in "\n".join(lines)
    for stage in ("extend/branch", "extend/add", "extend/finetune"):
        assert (workdir / stage / "stage.json").exists(), stage
    rows = {r["model"]: r for r in results["models"]}
    names = [r["model"] for r in results["models"]]
    assert names.index("BTX") < names.index("BTX + docs expert") < names.index("BTX + docs expert (finetuned)")
    btx, added, tuned = rows["BTX"], rows["BTX + docs expert"], rows["BTX + docs expert (finetuned)"]
    print("docs ppl: BTX", btx["ppl"]["docs"], "added", added["ppl"]["docs"], "finetuned", tuned["ppl"]["docs"])
    assert added["ppl"]["docs"] < btx["ppl"]["docs"] and tuned["ppl"]["docs"] < btx["ppl"]["docs"]
    for row in (added, tuned):
        assert set(row["interval"]) == {"code", "math", "prose", "docs"}
    table = (workdir / "report" / "results.md").read_text()
    assert "| BTX + docs expert |" in table and "| BTX + docs expert (finetuned) |" in table
    # the finetuned BTX's experts and router columns, bit for bit, in the extended checkpoint
    btx_params, extended = leaves(checkpoint.step_dir(workdir / "finetune")), leaves(workdir / "extend/add")
    for ffn in FFN:
        name = f"layers/moe/experts/{ffn}/kernel"
        np.testing.assert_array_equal(extended[name][:, :E], btx_params[name])
    np.testing.assert_array_equal(extended[ROUTER][:, :, :E], btx_params[ROUTER])
    # router-only finetune: only the router moved
    tuned_params = leaves(checkpoint.step_dir(workdir / "extend/finetune"))
    assert not np.array_equal(tuned_params[ROUTER], extended[ROUTER])
    np.testing.assert_array_equal(tuned_params["layers/moe/experts/up/kernel"], extended["layers/moe/experts/up/kernel"])

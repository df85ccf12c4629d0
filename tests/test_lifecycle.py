"""Expert lifecycle: masking experts at inference (moe.masked_experts), training a part of the model
(train.trainable), and the recipe's opt-out table (BTX with each expert removed, paired intervals).

Masking is checked against its definition: an MoE whose checkpoint has the expert removed (router
column and expert weights sliced out, E - 1 experts), run by the loop-over-experts reference.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from btx_jax import checkpoint, compare, evaluate, intervals, recipe, sharding, state as state_lib, steps, train
from btx_jax.config import ConfigError, load_config, validate
from btx_jax.models import router as router_lib
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, tiny_config
from test_moe import E, assert_close, inputs, moe_config, run_moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKED = 2
KEEP = [e for e in range(E) if e != MASKED]
# a bias that favours the masked expert most: masking must still keep it out of every choice
BIAS = np.array([0.08, -0.06, 0.5, 0.04, -0.08, 0.06, 0.02, -0.04], np.float32)
DISPATCHERS = ("reference", "einsum", "alltoall-blocks", "alltoall-native", "dropless-blocks", "dropless-native")


# ------------------------------------------------------------------------------ 1. masking experts

def removed(params: dict) -> dict:
    """The same layer without expert MASKED: its router column and expert weights dropped (E - 1 experts)."""
    return {"router": params["router"][:, KEEP], **{n: params[n][KEEP] for n in ("gate", "up", "down")}}


@functools.lru_cache(maxsize=None)
def without_expert(capacity_factor: float, biased: bool):
    """The E - 1 expert layer, loop-over-experts reference, one device."""
    cfg = dataclasses.replace(moe_config("reference", capacity_factor), num_experts=E - 1)
    return run_moe(cfg, "1", params=removed(inputs(0)[2]), bias=BIAS[KEEP] if biased else None)


def check_masked_equals_removed(dispatcher: str, mesh_name: str, capacity_factor: float = 8.0, biased: bool = False):
    cfg = dataclasses.replace(moe_config(dispatcher, capacity_factor), masked_experts=str(MASKED))
    y, aux, grads = run_moe(cfg, mesh_name, bias=BIAS if biased else None)
    y_ref, aux_ref, grads_ref = without_expert(capacity_factor, biased)
    assert_close(y, y_ref)
    assert_close(grads["x"], grads_ref["x"])
    assert_close(grads["router"][:, KEEP], grads_ref["router"])
    assert np.all(grads["router"][:, MASKED] == 0)  # a masked expert learns nothing
    for name in ("gate", "up", "down"):
        assert_close(grads[name][KEEP], grads_ref[name])
        assert np.all(grads[name][MASKED] == 0)
    for name in ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_entropy", "router_confidence"):
        assert_close(aux[name], aux_ref[name], rtol=1e-5)
    for name in ("expert_usage", "expert_load"):
        assert aux[name][MASKED] == 0
        assert_close(aux[name][KEEP], aux_ref[name], rtol=1e-5)
    return aux


@pytest.mark.parametrize("mesh_name", ["1", "d2e4"])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_masking_an_expert_equals_removing_it(dispatcher, mesh_name):
    """Forward, gradients and routing statistics of the E-expert layer with expert 2 masked equal those of
    the E - 1 expert layer built from the same checkpoint without expert 2 (the loop reference)."""
    check_masked_equals_removed(dispatcher, mesh_name)


@pytest.mark.parametrize("dispatcher", ["reference", "einsum", "alltoall-blocks"])
def test_masking_plans_capacity_for_the_experts_left(dispatcher):
    """With a capacity that drops tokens, the masked layer drops exactly what the E - 1 expert layer drops."""
    aux = check_masked_equals_removed(dispatcher, "d2e4" if dispatcher != "reference" else "1", capacity_factor=0.5)
    assert float(aux["dropped_fraction"]) > 0.05


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_masking_with_a_selection_bias(dispatcher):
    """moe.balance=bias: a bias that favours the masked expert does not bring it back; the rest of the bias
    acts as it would on the E - 1 expert layer."""
    check_masked_equals_removed(dispatcher, "d2e4", biased=True)


def test_top_k_never_chooses_a_masked_expert():
    """Whatever the logits and the bias: even where the other experts' probabilities underflow to 0, a masked
    expert (probability 0 too) is not picked; probabilities renormalise over the experts left."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 64, 8)), jnp.float32)
    kernel = rng.normal(0, 1.0, (8, 6)).astype(np.float32)
    kernel[:, 0] *= 30.0  # expert 0: the largest logit of about half the tokens
    mask = jnp.ones((4, 64), bool)
    bias = jnp.asarray([1.0, 0, 0, 1.0, 0, 0])
    unmasked = router_lib.route(x, jnp.asarray(kernel), mask, top_k=2, renormalize=True, bias=bias)
    assert np.isin(np.asarray(unmasked.experts), [0, 3]).all()  # what the bias would choose, unmasked
    for bias in (None, jnp.asarray([1.0, 0, 0, 1.0, 0, 0])):
        routing = router_lib.route(x, jnp.asarray(kernel), mask, top_k=2, renormalize=True, bias=bias, masked=(0, 3))
        experts, probs = np.asarray(routing.experts), np.asarray(routing.probs)
        assert not np.isin(experts, [0, 3]).any()
        assert np.all(probs[..., [0, 3]] == 0)
        logits = np.einsum("gsd,de->gse", np.asarray(x, np.float64), kernel[:, [1, 2, 4, 5]])
        want = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(probs[..., [1, 2, 4, 5]], want / want.sum(-1, keepdims=True), rtol=2e-5, atol=1e-7)
    # one expert left with all the probability: the second choice is among the other unmasked ones, not 0
    logits_kernel = np.zeros((8, 4), np.float32)
    logits_kernel[:, 3] = 200.0
    routing = router_lib.route(jnp.ones((1, 2, 8)), jnp.asarray(logits_kernel), jnp.ones((1, 2), bool), top_k=2,
                               renormalize=True, masked=(0,))
    assert np.asarray(routing.probs)[0, 0, 1] == 0  # underflow: experts 0, 1, 2 all read 0
    assert set(np.asarray(routing.experts)[0, 0]) == {3, 1}


def test_bias_update_leaves_masked_experts_out():
    """The bias moves the experts left towards their own fair share 1 / (E - m); a masked expert's bias stays."""
    bias = np.zeros((1, 4), np.float32)
    load = np.array([[0.0, 0.30, 0.34, 0.36]], np.float32)  # expert 0 masked: mean of the others 1/3
    got = np.asarray(router_lib.update_bias(jnp.asarray(bias), jnp.asarray(load), 0.01, masked=(0,)))
    np.testing.assert_allclose(got, [[0.0, 0.01, -0.01, -0.01]])
    plain = np.asarray(router_lib.update_bias(jnp.asarray(bias), jnp.asarray(load), 0.01))
    np.testing.assert_allclose(plain, [[0.01, -0.01, -0.01, -0.01]])  # counted, 0 pulls the mean to 0.25


@pytest.mark.parametrize("value, message", [("4", "do not exist"), ("1,x", "comma-separated expert indices"),
                                            ("1,1", "named twice"), ("0,1,2", "fewer than top_k=2"),
                                            ("-1", "comma-separated expert indices")])
def test_bad_masked_experts(value, message):
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=2, masked_experts=value)
    with pytest.raises(ConfigError, match=message) as error:
        validate(config)
    assert error.value.field == "moe.masked_experts"


def test_a_masked_model_scores_like_the_model_without_the_expert():
    """The whole transformer: a 4-expert checkpoint with expert 1 masked gives the logits of the 3-expert
    checkpoint made by slicing expert 1 out of every layer (dropless, the recipe's evaluation dispatcher).
    The mask as an input (`expert_keep`, how the recipe scores its opt-out rows) gives the config's
    numbers and routing (an array input: one compiled program serves every mask)."""
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=2, group_size=16, dispatcher="dropless")
    mesh = mesh_of(jax.devices()[:1])
    full = make_setup(config, mesh)
    params = jax.device_get(init_params(config, full, seed=0))
    params["layers"]["moe"]["router"]["kernel"] = np.random.default_rng(0).normal(0, 0.5, (2, 64, 4)).astype(np.float32)
    batch = steps.to_global(random_batch(config), steps.batch_shardings(mesh))

    def forward(c, p, keep=None):
        setup = make_setup(c, mesh)
        fn = steps._under_mesh(jax.jit(lambda p, b, k: steps.forward(setup.graphdef, p, b, expert_keep=k)), mesh)
        return jax.device_get(fn(p, batch, keep))

    masked = config.copy_and_resolve_references()
    masked.moe.masked_experts = "1"
    smaller = config.copy_and_resolve_references()
    smaller.moe.num_experts = 3
    sliced = jax.tree.map(lambda a: a, params)
    moe = sliced["layers"]["moe"]
    moe["router"]["kernel"] = moe["router"]["kernel"][..., [0, 2, 3]]
    for name in ("gate", "up", "down"):
        moe["experts"][name]["kernel"] = moe["experts"][name]["kernel"][:, [0, 2, 3]]
    (got, aux), (want, _), (plain, _) = forward(masked, params), forward(smaller, sliced), forward(config, params)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(plain - got).max() > 1e-2  # expert 1 mattered

    setup = make_setup(config, mesh)
    scorer = steps._under_mesh(jax.jit(lambda p, b, k: steps.forward(setup.graphdef, p, b, expert_keep=k)), mesh)
    by_input, aux_by_input = jax.device_get(scorer(params, batch, np.array([True, False, True, True])))
    np.testing.assert_array_equal(by_input, got)
    for name in ("expert_usage", "load_balance_loss", "router_z_loss", "router_entropy"):
        np.testing.assert_allclose(aux_by_input[name], aux[name], rtol=1e-6, err_msg=name)
    everything, _ = jax.device_get(scorer(params, batch, np.ones(4, bool)))
    np.testing.assert_array_equal(everything, plain)  # all kept: the model as trained


def test_an_expert_mask_as_input_needs_the_dropless_dispatcher():
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=2, group_size=16, dispatcher="einsum")
    mesh = mesh_of(jax.devices()[:1])
    setup = make_setup(config, mesh)
    params = init_params(config, setup, seed=0)
    batch = steps.to_global(random_batch(config), steps.batch_shardings(mesh))
    with pytest.raises(ValueError, match="expert_keep needs the dropless dispatcher"):
        with sharding.use_mesh(mesh):
            steps.forward(setup.graphdef, params, batch, expert_keep=np.ones(4, bool))


# ------------------------------------------------------------------------------ 2. train.trainable

def moe_train_config(**train_overrides):
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=2, group_size=16, dispatcher="einsum")
    config.train.update(**train_overrides)
    return config


def train_steps(config, count: int, mesh=None, make_tx=None):
    """(initial params, final state, [loss per step], [metrics per step]) of `count` steps on one fixed batch;
    `make_tx`: another optimizer (a function of the learning-rate schedule)."""
    mesh = mesh or mesh_of(data=4, expert=2)
    setup = make_setup(config, mesh)
    if make_tx is not None:
        setup = dataclasses.replace(setup, make_tx=make_tx)
    params = init_params(config, setup, seed=0)
    initial = jax.device_get(params)
    state = setup.init_state(params)
    shardings = steps.batch_shardings(mesh)
    step = steps.make_train_step(setup, shardings, config)
    batch = steps.to_global(random_batch(config), shardings)
    metrics = []
    for _ in range(count):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return initial, jax.device_get(state), [float(m["loss"]) for m in metrics], metrics


def paths_of(tree) -> dict:
    return {state_lib.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_the_routers_train():
    """train.trainable='router': after 3 steps only the router kernels moved (every other leaf bit-identical,
    weight decay included), the loss on the batch still fell, and Adam holds moments for the routers only."""
    initial, final, losses, metrics = train_steps(moe_train_config(trainable="router"), 3)
    before, after = paths_of(initial), paths_of(final["params"])
    assert set(before) == set(after)
    for path in before:
        if path == "layers/moe/router/kernel":
            assert np.abs(after[path] - before[path]).max() > 1e-4
        else:
            assert np.array_equal(after[path], before[path]), path
    assert losses[2] < losses[0] - 1e-4  # the same batch each step: only the routers moved, the loss fell
    moments = [a for a in jax.tree.leaves(final["opt_state"]) if np.ndim(a) > 0]
    assert [a.shape for a in moments] == [(2, 64, 4), (2, 64, 4)]  # Adam's mu and nu of the routers only


def test_grad_norm_covers_the_trained_params_only():
    """The logged grad_norm is the norm of the router gradients alone (computed here with jax.grad)."""
    config = moe_train_config(trainable="router")
    mesh = mesh_of(jax.devices()[:1])
    _, _, _, metrics = train_steps(config, 1, mesh)
    _, _, _, everything = train_steps(moe_train_config(), 1, mesh)
    setup = make_setup(config, mesh)
    params = init_params(config, setup, seed=0)
    batch = steps.to_global(random_batch(config), steps.batch_shardings(mesh))
    loss_fn = steps.make_loss_fn(setup.graphdef, config)
    rng = jax.random.fold_in(jax.random.key(config.train.seed), 0)
    grads = steps._under_mesh(jax.jit(jax.grad(lambda p: loss_fn(p, batch, rng, steps.token_totals(batch))[0])),
                              mesh)(params)
    router_norm = float(np.linalg.norm(np.asarray(grads["layers"]["moe"]["router"]["kernel"])))
    np.testing.assert_allclose(float(metrics[0]["grad_norm"]), router_norm, rtol=1e-5)
    assert float(everything[0]["grad_norm"]) > 2 * router_norm


def test_empty_trainable_changes_nothing():
    """train.trainable='' is the plain optimizer: the same state after a step as the original clipped AdamW, and
    as a config that has no trainable field at all."""
    config = moe_train_config(trainable="")
    o = config.optim
    def plain(learning_rate):
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adamw(
            learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=state_lib._decay_mask))
    _, got, _, got_metrics = train_steps(config, 1)
    _, want, _, want_metrics = train_steps(config, 1, make_tx=plain)
    legacy = moe_train_config()
    del legacy.train["trainable"]
    _, old, _, _ = train_steps(legacy, 1)
    for other in (want, old):
        assert jax.tree.structure(got) == jax.tree.structure(other)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other)):
            assert np.array_equal(a, b)
    assert float(got_metrics[0]["grad_norm"]) == float(want_metrics[0]["grad_norm"])


def test_bad_trainable():
    config = moe_train_config(trainable="router[")
    with pytest.raises(ConfigError, match="not a regular expression") as error:
        validate(config)
    assert error.value.field == "train.trainable"
    config = moe_train_config(trainable="^routers?/")
    with pytest.raises(ConfigError, match=r"(?s)matches no parameter.*layers/moe/router/kernel"):
        make_setup(config, mesh_of(jax.devices()[:1]))


def test_a_partly_trained_run_checkpoints_and_resumes(demo_data_dir, tmp_path):
    """train.run with train.trainable: its (smaller) optimizer state saves and resumes; the frozen params of the
    last checkpoint are those of the first."""
    config = load_config(os.path.join(REPO, "configs/demo_moe.py:tiny"))
    config.data.data_dir = demo_data_dir
    config.train.update(peak_flops=1e11, steps=4, checkpoint_every=2, keep_checkpoints=5, trainable="moe/router")
    config.optim.warmup_steps = 1
    train.run(config, str(tmp_path))
    config.train.steps = 6
    train.run(config, str(tmp_path))
    setup = make_setup(config, mesh_of(jax.devices()[:1]))
    first = paths_of(jax.device_get(checkpoint.load_params(str(tmp_path / "checkpoints" / "2"), setup.abstract_params)))
    last = paths_of(jax.device_get(checkpoint.load_params(str(tmp_path / "checkpoints" / "6"), setup.abstract_params)))
    for path in first:
        assert np.array_equal(first[path], last[path]) != (path == "layers/moe/router/kernel"), path
    config.train.update(steps=8, trainable="")  # the optimizer changed under the checkpoint: a clear refusal
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)optimizer state saved at step 6.*init_from"):
        train.run(config, str(tmp_path))


# ------------------------------------------------------------------------------ 3. the opt-out table

@pytest.mark.xdist_group("recipe")
def test_opt_out_table(tiny_recipe_run):
    """One row per expert (named by its domain, the seed's FFN last), every eval domain, each a perplexity, its
    change against the full BTX and the paired interval of the change; masking changes the scores."""
    config, workdir, results, _ = tiny_recipe_run  # conftest.py: its report has the opt-out table
    opt_out = results["opt_out"]
    assert list(opt_out) == ["code", "math", "prose", "seed"]
    btx = next(r for r in results["models"] if r["model"] == "BTX")
    for label, cells in opt_out.items():
        assert list(cells) == results["domains"] == ["code", "math", "prose", "docs"]
        for domain, cell in cells.items():
            low, high = cell["interval"]
            assert low <= cell["delta"] + 1e-9 and cell["delta"] - 1e-9 <= high, (label, domain)
            assert cell["delta"] == pytest.approx(cell["ppl"] - btx["ppl"][domain], abs=1e-9)
        assert any(abs(cell["delta"]) > 1e-4 for cell in cells.values()), label  # the expert was used somewhere
    table = (workdir / "report" / "results.md").read_text()
    assert "## Opting out one expert" in table and "| removed expert | code | math | prose | docs |" in table
    for label in opt_out:
        assert f"| {label} | " in table
    saved = np.load(workdir / "report" / "scores.npz")
    assert "BTX without code|0|code|nll" in saved.files
    on_disk = json.loads((workdir / "report" / "results.json").read_text())
    assert on_disk["opt_out"]["code"]["code"]["delta"] == pytest.approx(opt_out["code"]["code"]["delta"])


@pytest.mark.xdist_group("recipe")
def test_nothing_masked_is_the_btx_model(tiny_recipe_run):
    """Scored with an empty mask, the BTX model gives the report's BTX scores document by document, so its
    paired change is 0 with the interval (0, 0); and one masked expert gives the opt-out row."""
    config, workdir, results, _ = tiny_recipe_run  # conftest.py: its report has the opt-out table
    run = recipe.Recipe(config, str(workdir))
    run.check_finished([s.name for s in run.stages()], "the test")
    btx = next(m for m in run.models() if m["name"] == "BTX")
    eval_sets = evaluate.load_eval_sets(config, max_tokens=config.recipe.eval_tokens)
    scorer = compare.Scorer()
    saved = np.load(workdir / "report" / "scores.npz")
    nothing = compare.score_masked(run, btx, "", eval_sets, scorer)
    no_code = compare.score_masked(run, btx, "0", eval_sets, scorer)
    for domain in eval_sets:
        np.testing.assert_allclose(nothing[domain].nll, saved[f"BTX|0|{domain}|nll"], rtol=1e-6)
        np.testing.assert_allclose(no_code[domain].nll, saved[f"BTX without code|0|{domain}|nll"], rtol=1e-6)
    reported = {d: evaluate.DomainScores(saved[f"BTX|0|{d}|nll"], saved[f"BTX|0|{d}|tokens"]) for d in eval_sets}
    deltas = intervals.paired_deltas({"BTX": [reported], "nothing masked": [nothing]}, "BTX", list(eval_sets), num=200)
    for cell in deltas["nothing masked"].values():
        assert cell["delta"] == pytest.approx(0.0, abs=1e-6)
        assert cell["interval"][0] == pytest.approx(0.0, abs=1e-6) and cell["interval"][1] == pytest.approx(0.0, abs=1e-6)


def test_opt_out_needs_an_expert_to_spare(tmp_path):
    config = load_config(os.path.join(REPO, "configs/btx_demo.py:tiny"))
    config.moe.masked_experts = "0,1"  # 2 experts left for top-2: none can be removed
    with pytest.raises(ConfigError, match="fewer than top_k") as error:
        recipe.check(config, check_paths=False)
    assert error.value.field == "recipe.opt_out"
    config.recipe.opt_out = False
    recipe.check(config, check_paths=False)

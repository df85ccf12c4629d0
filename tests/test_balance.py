"""Load balancing (moe.balance): the selection bias of auxiliary-loss-free balancing (DeepSeek-V3) and
the sequence-wise balance loss, against numpy, the loop-over-experts reference and the real train step."""
import copy
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from btx_jax import checkpoint, graph, recipe, sharding, steps, train
from btx_jax.config import ConfigError, load_config, validate
from btx_jax.data import pipeline
from btx_jax.models import router as router_lib
from btx_jax.models.moe import MoE
from btx_jax.state import init_params, make_setup, saved_router_bias
from helpers import mesh_of, random_batch, tiny_config
from test_moe import D, E, F, K, assert_close, get_mesh, inputs, moe_config, numpy_moe, numpy_routing, run_moe, set_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def routing_of(experts, mask, num_experts, probs=None):
    """A Routing with the given choices [G, S, K] (and probs [G, S, E], uniform by default)."""
    experts = jnp.asarray(experts, jnp.int32)
    g, s, _ = experts.shape
    probs = jnp.full((g, s, num_experts), 1.0 / num_experts) if probs is None else jnp.asarray(probs, jnp.float32)
    return router_lib.Routing(experts, jnp.ones(experts.shape), jnp.asarray(mask), probs, jnp.log(probs))


def numpy_bias_update(bias, choices, mask, rate):
    """b_e += rate * sign(mean load - load_e), with load counted choice by choice over non-padding tokens."""
    new = np.array(bias, np.float64)
    for layer, (experts, m) in enumerate(zip(choices, mask)):
        counts = np.zeros(bias.shape[-1])
        for g, s in zip(*np.nonzero(m)):
            for e in experts[g, s]:
                counts[e] += 1
        load = counts / counts.sum()
        new[layer] += rate * np.sign(load.mean() - load)
    return new


# ------------------------------------------------------------------------------ 1. the bias update


def test_bias_update_matches_hand_computation():
    """Four tokens, top-2 of 4 experts: loads 4/8, 2/8, 1/8, 1/8 against a mean of 2/8."""
    routing = routing_of([[[0, 1], [0, 2], [0, 1], [3, 0]]], np.ones((1, 4), bool), 4)
    load = router_lib.router_metrics(routing, jnp.ones((1, 4, 2), bool), 4)["expert_load"]
    np.testing.assert_array_equal(load, [0.5, 0.25, 0.125, 0.125])
    new = router_lib.update_bias(jnp.asarray([[0.1, -0.2, 0.0, 0.3]]), load[None], 0.01)
    np.testing.assert_allclose(new, [[0.09, -0.2, 0.01, 0.31]], rtol=1e-6)

    rng = np.random.default_rng(0)  # two layers of random choices with padding; 3 x 7 x 2 is no multiple of 4
    choices = np.stack([[[rng.permutation(4)[:2] for _ in range(7)] for _ in range(3)] for _ in range(2)])
    mask = rng.random((2, 3, 7)) < 0.8
    mask[:, 0, :] = True
    bias = rng.normal(0, 0.1, (2, 4)).astype(np.float32)
    loads = jnp.stack([router_lib.router_metrics(routing_of(c, m, 4), jnp.ones(c.shape, bool), 4)["expert_load"]
                       for c, m in zip(choices, mask)])
    got = router_lib.update_bias(jnp.asarray(bias), loads, 0.003)
    np.testing.assert_allclose(got, numpy_bias_update(bias, choices, mask, 0.003), rtol=1e-6, atol=1e-7)


def test_train_step_moves_the_bias_by_the_global_load():
    """On a data x expert mesh with 2 microbatches, the step's new bias is the hand rule applied to the load of
    the whole batch (computed on one device), not to any shard's or microbatch's."""
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=2, group_size=16, dispatcher="einsum", balance="bias", bias_rate=0.01)
    config.data.batch_size = 16
    config.train.grad_accum = 2
    bias = np.random.default_rng(1).normal(0, 0.02, (2, 4)).astype(np.float32)
    batch = random_batch(config)

    one = make_setup(config, mesh_of(jax.devices()[:1]))
    params = jax.device_get(init_params(config, one, seed=0))
    def forward(p, b, r):  # train=True: the training capacity drops the same choices (layer 1 sees the same inputs)
        return steps.forward(one.graphdef, p, b, train=True, rng=jax.random.key(0), router_bias=r)[1]
    aux = steps._under_mesh(jax.jit(forward), one.mesh)(
        params, steps.to_global(batch, steps.batch_shardings(one.mesh)), jnp.asarray(bias))
    load = np.asarray(aux["expert_load"], np.float64)  # [L, E], the whole batch on one device

    mesh = mesh_of(data=4, expert=2)
    setup = make_setup(config, mesh)
    state = setup.init_state(jax.device_put(params, jax.tree.map(lambda a: a.sharding, setup.abstract_params)))
    state["router_bias"] = jax.device_put(bias, NamedSharding(mesh, P()))
    shardings = steps.batch_shardings(mesh)
    new_state, metrics = steps.make_train_step(setup, shardings, config)(state, steps.to_global(batch, shardings))
    want = bias + 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
    clear = np.abs(load - load.mean(-1, keepdims=True)) > 1e-6  # exact ties may round either way
    assert clear.sum() >= 6
    np.testing.assert_allclose(np.asarray(new_state["router_bias"])[clear], want[clear], rtol=1e-6)
    for e in range(4):
        np.testing.assert_allclose(metrics[f"moe/expert_load/{e}"], load[:, e], rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/bias_spread"], bias.max(-1) - bias.min(-1), rtol=1e-6)
    np.testing.assert_allclose(metrics["moe/load_imbalance"], load.max(-1) / load.mean(-1), rtol=1e-5)


# ------------------------------------------------------------------------------ 2. biased selection, unbiased gates

BIAS = np.array([0.08, -0.06, 0.0, 0.04, -0.08, 0.06, 0.02, -0.04], np.float32)


def run_biased(dispatcher: str, mesh_name: str, bias):
    """(y, grads w.r.t. x and the router kernel) of one MoE layer routed with `bias`."""
    y, _, grads = run_moe(moe_config(dispatcher), mesh_name, bias=bias)
    return y, {"x": grads["x"], "router": grads["router"]}


def numpy_biased_gates(x, params, seg, bias, gate_scores=None):
    """Gates [B, T, E]: top-k of probs + bias, each weighted by `gate_scores` (default: the unbiased probs)
    renormalized over the chosen experts."""
    _, probs, mask = numpy_routing(x, params, capacity=10**6, seg=seg)
    scores = probs if gate_scores is None else gate_scores
    chosen = np.argsort(-(probs + bias), axis=-1, kind="stable")[..., :K]
    w = np.take_along_axis(scores, chosen, -1)
    w = w / w.sum(-1, keepdims=True)
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, chosen, w, -1)
    return gates * mask[..., None], probs, mask


@pytest.fixture(scope="module")
def biased_reference():
    return run_biased("reference", "1", BIAS)


@pytest.mark.parametrize("mesh_name", ["1", "d2e4"])
@pytest.mark.parametrize("dispatcher", ["reference", "einsum", "alltoall-blocks", "alltoall-native",
                                        "dropless-blocks", "dropless-native"])
def test_bias_changes_choices_not_gates(dispatcher, mesh_name, biased_reference):
    """The bias moves tokens to other experts; each chosen expert is gated by its *unbiased* probability
    renormalized over the biased choice; every dispatcher agrees with the loop reference (gradients too)."""
    x, seg, params = inputs(0)
    y, grads = run_biased(dispatcher, mesh_name, BIAS)
    gates, probs, mask = numpy_biased_gates(x, params, seg, BIAS)
    unbiased = numpy_biased_gates(x, params, seg, np.zeros(E))[0]
    moved = ((gates > 0) != (unbiased > 0)).any(-1)[mask].mean()
    assert moved > 0.1  # the bias changed the top-k of many tokens
    assert_close(y, numpy_moe(x, params, gates))
    biased_gates = numpy_biased_gates(x, params, seg, BIAS, gate_scores=probs + BIAS)[0]
    assert np.abs(numpy_moe(x, params, biased_gates) - y).max() > 100 * np.abs(numpy_moe(x, params, gates) - y).max()
    y_ref, grads_ref = biased_reference
    assert_close(y, y_ref)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name])
    if dispatcher == "reference" and mesh_name == "1":  # no bias: today's routing, which differs
        y_plain, _ = run_biased("reference", "1", None)
        assert_close(y_plain, numpy_moe(x, params, unbiased))


# ------------------------------------------------------------------------------ 3. balancing a skewed router


def skewed(top_k: int, **moe_overrides):
    """A tiny MoE whose routers send ~80% of the tokens to expert 0 (top-1): the embeddings share a
    direction u and every router column 0 points along it; the optimizer is frozen (lr 0), so only the
    bias can move the routing."""
    config = tiny_config()
    config.moe.update(**{"num_experts": 4, "top_k": top_k, "group_size": 16, "dispatcher": "einsum", "balance": "bias",
                         "router_z_weight": 0.0, **moe_overrides})
    config.data.batch_size = 32
    config.optim.lr = 0.0  # (validation wants lr > 0; the step itself does not care)
    mesh = mesh_of(data=4, expert=2)
    setup = make_setup(config, mesh)
    params = jax.tree.map(np.array, jax.device_get(init_params(config, setup, seed=0)))
    u = np.random.default_rng(0).normal(size=config.model.d_model)
    u /= np.linalg.norm(u)
    params["embed"]["embedding"] += 0.03 * u
    params["layers"]["moe"]["router"]["kernel"][:, :, 0] += u
    params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, setup.abstract_params))
    return config, setup, params


def held_out_load(setup, params, bias) -> np.ndarray:
    """[L, E] load on 64 held-out rows (what the bias did not see)."""
    config = tiny_config()
    config.data.batch_size = 64
    shardings = steps.batch_shardings(setup.mesh)
    fn = steps._under_mesh(jax.jit(lambda p, b, r: steps.forward(setup.graphdef, p, b, router_bias=r)[1]), setup.mesh)
    return np.asarray(fn(params, steps.to_global(random_batch(config, seed=999), shardings), bias)["expert_load"])


def test_bias_balances_a_skewed_router_without_touching_it():
    """From ~82% of the tokens on expert 0 (max/mean load 3.3), 120 real train steps at bias_rate 0.003 bring
    every layer's held-out max/mean load under 1.3, with the parameters frozen: the balance is the bias's."""
    config, setup, params = skewed(top_k=1, bias_rate=0.003)
    before = held_out_load(setup, params, None)
    assert (before[:, 0] > 0.75).all() and (before.max(-1) / before.mean(-1) > 3.0).all()
    state = setup.init_state(params)
    shardings = steps.batch_shardings(setup.mesh)
    train_step = steps.make_train_step(setup, shardings, config)
    imbalance = []
    for i in range(120):
        state, metrics = train_step(state, steps.to_global(random_batch(config, seed=i), shardings))
        imbalance.append(float(np.max(metrics["moe/load_imbalance"])))
    after = held_out_load(setup, state["params"], state["router_bias"])
    assert (after.max(-1) / after.mean(-1) < 1.3).all(), after
    assert np.mean(imbalance[-20:]) < 1.35 < np.mean(imbalance[:5])  # per training batch, too
    bias = np.asarray(state["router_bias"])
    assert (bias[:, 0] < -0.15).all() and (bias[:, 1:] > 0.1).all()  # expert 0 pushed down, the rest up
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)
    # the bias is state, not a parameter: the optimizer's state is exactly that of the params
    assert set(state) == {"params", "opt_state", "step", "router_bias"}
    assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(setup.tx.init(state["params"]))
    assert not any("router_bias" in jax.tree_util.keystr(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(state["opt_state"])[0])


def test_bias_adds_no_gradient():
    """With balance=bias the loss is the LM loss plus the z-loss: its gradients (router kernel included) equal
    those of aux balancing with weight 0 routed by the same bias; aux balancing with weight 0.01 differs."""
    config, setup, params = skewed(top_k=2, router_z_weight=0.001)
    bias = jnp.asarray(np.random.default_rng(2).normal(0, 0.05, (2, 4)), jnp.float32)
    shardings = steps.batch_shardings(setup.mesh)
    batch = steps.to_global(random_batch(config), shardings)

    def router_grad(**moe):
        c = copy.deepcopy(config)
        c.moe.update(**moe)
        loss_fn = steps.make_loss_fn(setup.graphdef, c)
        grad = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), steps.token_totals(batch), bias)[0])
        return np.asarray(steps._under_mesh(jax.jit(grad), setup.mesh)(params)["layers"]["moe"]["router"]["kernel"])

    with_bias = router_grad(balance="bias", load_balance_weight=0.01)
    np.testing.assert_allclose(with_bias, router_grad(balance="aux", load_balance_weight=0.0), rtol=1e-6, atol=1e-12)
    assert np.abs(router_grad(balance="aux", load_balance_weight=0.01) - with_bias).max() > 1e-3 * np.abs(with_bias).max()


# ------------------------------------------------------------------------------ 4. the sequence-wise loss


def numpy_sequence_loss(experts, probs, mask, num_experts):
    """E * sum_e f_e p_e per row ([B, T, K] choices, [B, T, E] probs, [B, T] mask), averaged over rows with tokens."""
    losses = []
    for row_experts, row_probs, m in zip(experts, probs, mask):
        if not m.any():
            continue
        f = np.zeros(num_experts)
        for choice in row_experts[m]:
            for e in choice:
                f[e] += 1
        f /= m.sum() * experts.shape[-1]
        p = row_probs[m].mean(0)
        losses.append(num_experts * np.sum(f * p))
    return np.mean(losses)


def test_sequence_loss_sees_unbalanced_sequences_in_a_balanced_batch():
    """Row 0 sends every token to expert 0 (p = 0.9), row 1 to expert 1: the batch is balanced (Switch loss
    2 * (0.5 * 0.5 + 0.5 * 0.5) = 1) but each sequence is not (2 * 1 * 0.9 = 1.8)."""
    experts = np.concatenate([np.zeros((1, 8, 1)), np.ones((1, 8, 1))]).reshape(4, 4, 1)  # 2 groups per row
    probs = np.concatenate([np.tile([0.9, 0.1], (8, 1)), np.tile([0.1, 0.9], (8, 1))]).reshape(4, 4, 2)
    routing = routing_of(experts, np.ones((4, 4), bool), 2, probs)
    assert float(router_lib.router_losses(routing, 2)["load_balance_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert float(router_lib.sequence_balance_loss(routing, 2, sequences=2)) == pytest.approx(1.8, abs=1e-6)


def test_sequence_loss_matches_numpy():
    """The MoE layer's sequence loss (balance=sequence) against a per-row numpy loop, with padding and a row of
    padding only; moe_loss weighs it by load_balance_weight, and balance=bias drops the balancing term."""
    x, seg, params = inputs(3)
    seg = seg.copy()
    seg[2] = 0  # an empty row: not a sequence
    with sharding.use_mesh(get_mesh("1")):
        model = MoE(moe_config("einsum", balance="sequence"), D, F, std=0.02, param_dtype="float32",
                    dtype="float32", rngs=nnx.Rngs(0))
        set_params(model, params)
        _, aux = model(jnp.asarray(x), jnp.asarray(seg))
    _, probs, mask = numpy_routing(x, params, capacity=10**6, seg=seg)
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
    want = numpy_sequence_loss(experts, probs, mask, E)
    np.testing.assert_allclose(aux["sequence_balance_loss"], want, rtol=1e-5)
    assert abs(want - float(aux["load_balance_loss"])) > 0.01
    aux = {k: v[None] for k, v in aux.items()}  # one MoE layer
    cfg = tiny_config().moe
    cfg.update(load_balance_weight=0.5, router_z_weight=0.25)
    z = 0.25 * float(aux["router_z_loss"][0])
    for balance, want_loss in [("sequence", 0.5 * want + z), ("aux", 0.5 * float(aux["load_balance_loss"][0]) + z),
                               ("bias", z)]:
        cfg.balance = balance
        assert float(steps.moe_loss(aux, cfg)[0]) == pytest.approx(want_loss, rel=1e-5)


# ------------------------------------------------------------------------------ 5. checkpoints, init_from, config


def _moe_tiny(data_dir, **train_overrides):
    config = load_config(os.path.join(REPO, "configs/demo_moe.py:tiny"))
    config.data.data_dir = data_dir
    config.moe.update(balance="bias", bias_rate=0.01)
    config.train.update(peak_flops=1e11, **train_overrides)
    return config


def _initial_state(config, workdir):
    setup = make_setup(config, sharding.make_mesh(config.mesh))
    iterator = pipeline.train_iterator(config.data, pipeline.open_sources(config.data, "train"))
    return train.initial_state(config, setup, checkpoint.make_manager(str(workdir), 3), iterator)[0], setup


def test_bias_survives_resume_and_init_from_starts_at_zero(demo_data_dir, tmp_path):
    """An interrupted run resumed from its step-3 checkpoint ends with the uninterrupted run's bias; the bias
    restores onto another mesh; init_from loads params only (bias 0); a resume must keep moe.balance."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = _moe_tiny(demo_data_dir, steps=6, log_every=1, eval_every=6, checkpoint_every=3)
    train.run(config, str(full))
    shutil.copytree(full / "checkpoints" / "3", resumed / "checkpoints" / "3")
    train.run(config, str(resumed))
    mesh = sharding.make_mesh(config.mesh)
    bias_full, bias_resumed = (np.asarray(saved_router_bias(str(d), mesh)) for d in (full, resumed))
    assert bias_full.shape == (2, 4) and np.abs(bias_full).max() > 0
    np.testing.assert_array_equal(bias_resumed, bias_full)
    other = mesh_of(data=2, expert=4)
    moved = saved_router_bias(str(full), other)
    assert moved.sharding.mesh.shape == other.shape and moved.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(moved), bias_full)

    child = _moe_tiny(demo_data_dir, steps=6, init_from=str(full))
    state, setup = _initial_state(child, tmp_path / "child")
    np.testing.assert_array_equal(np.asarray(state["router_bias"]), np.zeros((2, 4)))
    full_params = jax.device_get(checkpoint.load_params(str(full), setup.abstract_params))
    for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)

    config.moe.balance = "aux"
    with pytest.raises(checkpoint.CheckpointError, match="moe.balance=bias"):
        _initial_state(config, full)


@pytest.mark.parametrize("field,value,message", [("balance", "loss_free", "unknown balancing"),
                                                 ("bias_rate", 0.0, "must be in (0, 1)")])
def test_bad_balance_config(field, value, message):
    config = tiny_config()
    config.moe.update(num_experts=4, **{field: value})
    with pytest.raises(ConfigError, match=f"config.moe.{field}") as err:
        validate(config)
    assert message in str(err.value) and "fix:" in str(err.value)


def test_recipe_variants_finetune_from_the_mix_with_their_balancing(tmp_path):
    config = load_config(os.path.join(REPO, "configs/btx_demo.py:tiny"))
    config.recipe.update(variants="bias_balance,sequence_balance", baselines="")
    recipe.check(config, check_paths=False)
    stages = {s.name: s for s in graph.trial_stages(config, lambda name: tmp_path / name, ["code", "math", "prose"])}
    for name, balance in [("variant/bias_balance", "bias"), ("variant/sequence_balance", "sequence")]:
        assert stages[name].inputs == ["mix"] and stages[name].config.moe.balance == balance
        assert stages[name].config.train.init_from == str(tmp_path / "mix" / "checkpoint")
    assert stages["finetune"].config.moe.balance == "aux"

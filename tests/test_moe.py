"""The MoE layer: dispatchers against the loop-over-experts reference and numpy, on several meshes.

Meshes: 1 device, (expert=8), (data=2, expert=4), (fsdp=2, expert=2, tensor=2).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from btx_jax import sharding, steps
from btx_jax.models import dispatch, router as router_lib
from btx_jax.models.grouped_ffn import default_capacity, default_granule, grouped_ffn
from btx_jax.models.moe import MoE, MoEConfig
from btx_jax.models.transformer import MLP, TransformerConfig
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, tiny_config

E, K, D, F = 8, 2, 32, 48
B, T, S = 8, 32, 16  # rows, tokens per row, tokens per routing group
MESHES = {"1": {}, "e8": dict(expert=8), "d2e4": dict(data=2, expert=4), "f2e2t2": dict(fsdp=2, expert=2, tensor=2)}
# dispatcher-grouped_impl: "blocks" skips empty row blocks (the CPU path); "native" is ragged_dot
# for dropless and dense capacity buffers for alltoall (the TPU/GPU paths, also correct on CPU)
DISPATCHERS = ("einsum", "alltoall-blocks", "alltoall-native", "dropless-blocks", "dropless-native")


def get_mesh(name):
    axes = MESHES[name]
    return mesh_of(jax.devices()[:1] if not axes else jax.devices(), **axes)


def moe_config(dispatcher, capacity_factor=8.0, **overrides):
    """capacity_factor=8 gives capacity >= S: nothing can be dropped. `dispatcher` may name an impl: 'dropless-native'."""
    dispatcher, _, impl = dispatcher.partition("-")
    overrides = {"top_k": K, **overrides}
    return MoEConfig(num_experts=E, dispatcher=dispatcher, group_size=S, train_capacity_factor=capacity_factor,
                     eval_capacity_factor=capacity_factor, grouped_impl=impl or "auto", grouped_block=4, **overrides)


@functools.lru_cache(maxsize=None)
def inputs(seed=0):
    """Tokens [B, T, D] with padding at the end of each row, and parameters with a spread-out router."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[:, -3:] = 0
    params = {"router": rng.normal(0, 0.5, (D, E)), "gate": rng.normal(0, D**-0.5, (E, D, F)),
              "up": rng.normal(0, D**-0.5, (E, D, F)), "down": rng.normal(0, F**-0.5, (E, F, D))}
    return x, seg, {k: v.astype(np.float32) for k, v in params.items()}


def set_params(model, params):
    model.router.kernel[...] = params["router"]
    for name in ("gate", "up", "down"):
        getattr(model.experts, name).kernel[...] = params[name]


def run_moe(cfg: MoEConfig, mesh_name: str, seed=0, train=False, params=None, bias=None):
    """(y, aux, grads w.r.t. x and every parameter) of one MoE layer on a mesh; `params` replace the
    inputs' parameters (e.g. a layer with an expert removed), `bias` is the router's selection bias."""
    x, seg, default_params = inputs(seed)
    params = default_params if params is None else params
    mesh = get_mesh(mesh_name)
    with sharding.use_mesh(mesh):
        model = MoE(cfg, D, F, std=0.02, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0))
        set_params(model, params)
        graphdef, state = nnx.split(model)
        shardings = nnx.get_named_sharding(state, mesh)
        state = jax.device_put(state, shardings)
        x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
        weights = jnp.asarray(np.random.default_rng(99).normal(size=(B, T, D)), jnp.float32)

        def loss(state, x, bias):
            y, aux = nnx.merge(graphdef, state)(x, jnp.asarray(seg), train=train, router_bias=bias)
            return jnp.sum(y * weights), (y, aux)

        (_, (y, aux)), (g_state, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            state, x, None if bias is None else jnp.asarray(bias))
    g_state = nnx.to_pure_dict(g_state)
    grads = {"x": g_x, "router": g_state["router"]["kernel"],
             **{n: g_state["experts"][n]["kernel"] for n in ("gate", "up", "down")}}
    return jax.device_get((y, aux, grads))


def assert_close(got, want, rtol=1e-4, atol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(scale, 1.0))


@functools.lru_cache(maxsize=None)
def reference_result():
    return run_moe(moe_config("reference"), "1")


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_dispatcher_matches_reference(dispatcher, mesh_name):
    """Forward, gradients (inputs, router, experts) and every aux value equal the 1-device reference."""
    y, aux, grads = run_moe(moe_config(dispatcher), mesh_name)
    y_ref, aux_ref, grads_ref = reference_result()
    assert float(aux_ref["dropped_fraction"]) == 0.0
    assert_close(y, y_ref)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name])
    assert set(aux) == set(aux_ref)
    for name in aux_ref:
        assert_close(aux[name], aux_ref[name], rtol=1e-5)


def numpy_routing(x, params, capacity, priority="token", seg=None, k=K):
    """An independent routing policy written as loops: returns gates [N, E] after drops, per group.

    Gates: top-1 uses the router probability itself (Switch); top-k (k > 1) renormalizes."""
    g_count = B * T // S
    xs = x.reshape(g_count, S, D).astype(np.float64)
    mask = np.ones((g_count, S), bool) if seg is None else seg.reshape(g_count, S) != 0
    logits = xs @ params["router"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gates = np.zeros((g_count, S, E))
    for g in range(g_count):
        top = np.argsort(-probs[g], axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(probs[g], top, axis=-1)
        if k > 1:
            w /= w.sum(-1, keepdims=True)
        tokens = [s for s in range(S) if mask[g, s]]
        if priority == "confidence":
            tokens = sorted(tokens, key=lambda s: -probs[g, s].max())
        load = np.zeros(E, int)
        for j in range(k):  # all first choices, then all second choices
            for s in tokens:
                e = top[s, j]
                if load[e] < capacity:
                    gates[g, s, e] = w[s, j]
                load[e] += 1
    return gates.reshape(B, T, E), probs.reshape(B, T, E), mask.reshape(B, T)


def numpy_moe(x, params, gates):
    """y = sum_e gate_e * SwiGLU_e(x) in float64."""
    x64 = x.astype(np.float64)
    y = np.zeros_like(x64)
    for e in range(E):
        h = x64 @ params["gate"][e]
        h = h / (1 + np.exp(-h)) * (x64 @ params["up"][e])
        y += gates[..., e:e + 1] * (h @ params["down"][e])
    return y


@pytest.mark.parametrize("priority", ["token", "confidence"])
def test_capacity_positions_match_python_loop(priority):
    """The vectorized queue positions keep exactly the choices a sequential loop keeps."""
    x, seg, params = inputs(1)
    capacity = 4
    want, _, _ = numpy_routing(x, params, capacity, priority, seg)
    groups = jnp.asarray(x.reshape(-1, S, D))
    routing = router_lib.route(groups, jnp.asarray(params["router"]), jnp.asarray(seg.reshape(-1, S) != 0),
                               top_k=K, renormalize=True)
    kept = router_lib.slot_positions(routing, E, priority) < capacity
    got = np.zeros((B * T // S, S, E))
    g, s, j = np.nonzero(np.asarray(kept))
    got[g, s, np.asarray(routing.experts)[g, s, j]] = np.asarray(routing.weights)[g, s, j]
    assert 0 < (want > 0).sum() < K * seg.sum()  # some choices are dropped, some kept
    np.testing.assert_allclose(got.reshape(B, T, E), want, atol=1e-6)


@pytest.mark.parametrize("mesh_name", ["1", "e8", "d2e4"])
@pytest.mark.parametrize("dispatcher", ["einsum", "alltoall-blocks", "alltoall-native"])
@pytest.mark.parametrize("priority", ["token", "confidence"])
def test_drops_match_numpy_policy(dispatcher, mesh_name, priority):
    """With a capacity that forces drops, the output is numpy's MoE with numpy's drop policy."""
    x, seg, params = inputs(0)
    cfg = moe_config(dispatcher, capacity_factor=0.5, priority=priority)
    capacity = router_lib.capacity(S, E, K, 0.5)
    y, aux, _ = run_moe(cfg, mesh_name)
    gates, _, mask = numpy_routing(x, params, capacity, priority, seg)
    dropped = 1 - (gates > 0).sum() / (K * mask.sum())
    assert dropped > 0.1
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped, atol=1e-6)
    assert_close(y, numpy_moe(x, params, gates))
    fully_dropped = (gates.sum(-1) == 0) & mask
    assert fully_dropped.any()
    assert np.all(np.asarray(y)[fully_dropped] == 0.0)  # nothing added: these pass through the residual


@pytest.mark.parametrize("dispatcher", ["reference", *DISPATCHERS])
def test_top1_gate_is_router_probability(dispatcher):
    """top_k=1 (renormalize on): y = p_top1 * FFN_top1(x), as in Switch, not the bare FFN output."""
    x, seg, params = inputs(0)
    y, aux, grads = run_moe(moe_config(dispatcher, top_k=1), "d2e4")
    gates, probs, mask = numpy_routing(x, params, capacity=10**6, seg=seg, k=1)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(gates.max(-1)[mask], probs.max(-1)[mask], rtol=1e-12)
    assert np.mean(gates.max(-1)[mask]) < 0.9  # far from the renormalized gate 1
    assert_close(y, numpy_moe(x, params, gates))
    assert np.linalg.norm(grads["router"]) > 1e-3 * np.linalg.norm(grads["gate"])


def test_aux_values_match_numpy():
    """Load-balancing loss, z-loss, usage, entropy and confidence against their formulas in numpy."""
    x, seg, params = inputs(0)
    _, aux, _ = reference_result()
    gates, probs, mask = numpy_routing(x, params, capacity=10**6, seg=seg)
    logits = x.astype(np.float64) @ params["router"]
    m = mask.astype(np.float64)
    n = m.sum()
    f = ((gates > 0) * m[..., None]).sum((0, 1)) / (n * K)
    p = (probs * m[..., None]).sum((0, 1)) / n
    log_z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(aux["load_balance_loss"], E * np.sum(f * p), rtol=1e-5)
    np.testing.assert_allclose(aux["router_z_loss"], (log_z**2 * m).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(aux["expert_usage"], f, atol=1e-6)
    np.testing.assert_allclose(aux["router_entropy"], (-(probs * np.log(probs)).sum(-1) * m).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(aux["router_confidence"], (probs.max(-1) * m).sum() / n, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dispatcher", ["reference", *DISPATCHERS])
def test_upcycling_identity(dispatcher, top_k):
    """E copies of one dense FFN with renormalized top-k weights (k >= 2) reproduce the dense FFN,
    whatever the router; with top-1 the gate is the router probability, so the output is p * FFN."""
    x, _, params = inputs(2)
    tcfg = TransformerConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                             mlp_dim=F)
    with sharding.use_mesh(get_mesh("1")):
        mlp = MLP(tcfg, nnx.Rngs(3))
        dense = np.asarray(mlp(jnp.asarray(x)))
        copies = {"router": params["router"],
                  **{n: np.repeat(np.asarray(getattr(mlp, n).kernel[...])[None], E, axis=0) for n in ("gate", "up", "down")}}
    with sharding.use_mesh(get_mesh("d2e4")):
        model = MoE(moe_config(dispatcher, top_k=top_k), D, F, std=0.02, param_dtype="float32", dtype="float32",
                    rngs=nnx.Rngs(0))
        set_params(model, copies)
        y, aux = nnx.jit(lambda m, x: m(x, jnp.ones((B, T), jnp.int32)))(model, jnp.asarray(x))
    assert float(aux["dropped_fraction"]) == 0.0
    if top_k == 1:
        _, probs, _ = numpy_routing(x, params, capacity=10**6, k=1)
        dense = probs.max(-1, keepdims=True) * dense
    assert_close(jax.device_get(y), dense)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_lm_loss_gradient(top_k):
    """With the router losses off, the LM loss alone trains the router, for top-1 as for top-2
    (renormalize on: a top-1 gate p / p == 1 would have no gradient)."""
    config = tiny_config()
    config.moe.update(num_experts=4, top_k=top_k, group_size=16, renormalize=True, load_balance_weight=0.0,
                      router_z_weight=0.0)
    mesh = mesh_of(jax.devices()[:1])
    setup = make_setup(config, mesh)
    params = init_params(config, setup, seed=0)
    batch = steps.to_global(random_batch(config), steps.batch_shardings(mesh))

    def loss_fn(p, b, rng):  # the train step's loss
        logits, aux = steps.forward(setup.graphdef, p, b, train=True, rng=rng)
        router_loss, _ = steps.moe_loss(aux, config.moe)
        return steps.lm_loss(logits, b, config.optim.z_loss)[0] + router_loss

    grads = jax.device_get(steps._under_mesh(jax.jit(jax.grad(loss_fn)), mesh)(params, batch, jax.random.key(0)))
    router = np.linalg.norm(grads["layers"]["moe"]["router"]["kernel"])
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    assert router > 1e-4 * total, (router, total)  # ~3e-3 (top-1) and ~6e-3 (top-2); a top-1 gate of 1: ~6e-10


def test_train_mode_uses_train_capacity_and_jitter():
    """train=True: the training capacity factor applies (more drops) and jitter changes the routing."""
    cfg = moe_config("einsum", capacity_factor=8.0)
    cfg = MoEConfig(**{**cfg.__dict__, "train_capacity_factor": 0.5, "router_jitter": 0.5})
    x, seg, params = inputs(0)
    with sharding.use_mesh(get_mesh("1")):
        model = MoE(cfg, D, F, std=0.02, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0))
        set_params(model, params)
        _, eval_aux = model(jnp.asarray(x), jnp.asarray(seg))
        _, train_aux = model(jnp.asarray(x), jnp.asarray(seg), train=True, rng=jax.random.key(1))
    assert float(eval_aux["dropped_fraction"]) == 0.0
    assert float(train_aux["dropped_fraction"]) > 0.1
    assert float(train_aux["router_entropy"]) != pytest.approx(float(eval_aux["router_entropy"]), abs=1e-7)


def test_default_granule_divides_the_block_and_bounds_sizes_and_waste():
    """At most 16 remainder sizes; coarser only as far as 1/32 of an expert's expected rows (the rows computed
    in vain per expert stay under that), never coarser than a quarter block."""
    for block in (16, 24, 32, 128, 256, 512):
        for rows, experts in ((0, 1), (4096, 32), (8192, 4), (65536, 8), (100, 3)):
            granule = default_granule(block, rows, experts)
            assert block % granule == 0 and block // granule <= 16
            assert granule <= max(8, block // 16, rows // (32 * experts)) and granule <= max(block // 4, 8)
    assert default_granule(256) == default_granule(256, 4096, 32) == 16  # MOE_BENCH's E=32 layer
    assert default_granule(256, 8192, 4) == 64  # the demo MoE: 4 sizes
    assert default_granule(32, 1024, 4) == 8  # the tests' 32-row blocks


@pytest.mark.parametrize("capacity", [None, 4, 40])
@pytest.mark.parametrize("counts,granule", [([5, 0, 37, 16, 1, 0, 22, 3], 4), ([0, 0, 0, 0, 0, 0, 0, 84], 4),
                                            ([0] * 8, 4), ([3, 17, 30, 0, 9, 0, 0, 20], 2)])
def test_grouped_ffn_matches_a_loop_over_experts(counts, granule, capacity):
    """The batched part (capacity rows per expert; default 16 here) and the loop's full blocks and
    rounded-up blocks spilling into the next experts (capacity 4: with granule 2, 13 rows left run as
    one block of 14, 5 as one of 6; capacity 16 for 84 rows in one expert); 40: no overflow at all.
    Values and all gradients against every expert applied to every row, masked."""
    rng = np.random.default_rng(5)
    rows = 90  # > sum(counts): trailing rows are padding, with nonzero inputs that must not leak
    x = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
    w = {"gate": rng.normal(0, D**-0.5, (E, D, F)), "up": rng.normal(0, D**-0.5, (E, D, F)),
         "down": rng.normal(0, F**-0.5, (E, F, D))}
    w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    expert_of_row = np.full(rows, -1)
    expert_of_row[:sum(counts)] = np.repeat(np.arange(E), counts)
    cotangent = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)

    def looped(x, w):
        y = sum(jnp.asarray(expert_of_row == e)[:, None]
                * ((jax.nn.silu(x @ w["gate"][e]) * (x @ w["up"][e])) @ w["down"][e]) for e in range(E))
        return jnp.sum(y * cotangent)

    def grouped(x, w):
        y = grouped_ffn(x, jnp.asarray(counts, jnp.int32), w["gate"], w["up"], w["down"], block=16,
                        granule=granule, capacity=capacity)
        return jnp.sum(y * cotangent)

    want, want_grads = jax.jit(jax.value_and_grad(looped, argnums=(0, 1)))(x, w)
    got, got_grads = jax.jit(jax.value_and_grad(grouped, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert_close(a, b)
    assert not np.any(np.asarray(got_grads[0])[sum(counts):])  # padding rows get no gradient


def test_default_capacity_is_the_expected_share_and_one_deviation_rounded_up():
    # 256 + sqrt(256) = 272; 1024 + 32 = 1056; 112 + 10.6 = 122.6 -> 128; 100 + 10 = 110 -> 112
    assert default_capacity(256, 16) == 272 and default_capacity(1024, 16) == 1056
    assert default_capacity(112, 16) == 128 and default_capacity(100, 8) == 112
    assert default_capacity(0.5, 8) == 8  # at least one granule


def test_permute_rows_and_its_gradient_match_numpy():
    """The sort into expert order and back: values, and the gradient (a gather by the inverse) against numpy."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    cotangent = rng.normal(size=(12, 3)).astype(np.float32)
    order = rng.permutation(12).astype(np.int32)
    inverse = dispatch.inverse_permutation(jnp.asarray(order))
    np.testing.assert_array_equal(np.asarray(inverse)[order], np.arange(12))
    y, vjp = jax.vjp(lambda x: dispatch.permute_rows(x, jnp.asarray(order), inverse), jnp.asarray(x))
    np.testing.assert_array_equal(y, x[order])
    want = np.zeros_like(x)
    want[order] = cotangent  # d/dx of sum(x[order] * c): row order[i] gets c[i]
    np.testing.assert_array_equal(vjp(jnp.asarray(cotangent))[0], want)
    # one row per choice of 6 tokens with K = 2 choices each (flattened [N, K] order), and its gradient
    tokens = jnp.asarray(x[:6])
    rows, vjp = jax.vjp(lambda t: dispatch._choice_rows(t, 2, jnp.asarray(order), inverse, jnp.float32), tokens)
    np.testing.assert_array_equal(rows, np.repeat(x[:6], 2, axis=0)[order])
    want = np.zeros((12, 3), np.float32)
    want[order] = cotangent
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], want.reshape(6, 2, 3).sum(axis=1), rtol=1e-6)

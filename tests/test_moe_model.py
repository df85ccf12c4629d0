"""MoE transformers: parameter layout, sharded steps equal one device, training and resume, bad input."""
import os
import shutil

import jax
import numpy as np
import pytest

from btx_jax import sharding, steps, train
from btx_jax.config import ConfigError, load_config, validate
from btx_jax.flops import matmul_params
from btx_jax.metrics import read_metrics
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moe_tiny(**moe):
    config = tiny_config()
    config.moe.update(**{"num_experts": 4, "top_k": 2, "group_size": 16, **moe})
    return config


@pytest.mark.parametrize("every", [1, 2])
def test_parameter_layout(every):
    """Experts [L_moe, E, D, F] parallel to the dense FFN; moe_every=2 keeps the other layers dense."""
    config = moe_tiny(moe_every=every)
    params = make_setup(config, mesh_of(jax.devices()[:1])).abstract_params
    moe = params["layers"]["moe"]
    n, d, f = 2 // every, 64, 128
    assert moe["experts"]["gate"]["kernel"].shape == (n, 4, d, f)
    assert moe["experts"]["down"]["kernel"].shape == (n, 4, f, d)
    assert moe["router"]["kernel"].shape == (n, d, 4)
    assert "mlp" not in params["layers"]
    if every == 2:
        assert params["dense_layers"]["mlp"]["gate"]["kernel"].shape == (1, 1, d, f)
    else:
        assert "dense_layers" not in params


def test_expert_weights_are_sharded_over_the_expert_axis():
    config = moe_tiny()
    config.mesh.update(data=2, expert=4)
    params = make_setup(config, mesh_of(data=2, expert=4)).abstract_params
    assert tuple(params["layers"]["moe"]["experts"]["gate"]["kernel"].sharding.spec) == (None, "expert", "fsdp", "tensor")


def _loss_and_grads(config, mesh, params_host, batch):
    setup = make_setup(config, mesh)
    params = jax.device_put(params_host, jax.tree.map(lambda a: a.sharding, setup.abstract_params))
    shardings = steps.batch_shardings(mesh)

    def loss_fn(p, b):
        logits, aux = steps.forward(setup.graphdef, p, b)
        router_loss, _ = steps.moe_loss(aux, config.moe)
        return steps.lm_loss(logits, b)[0] + router_loss

    fn = steps._under_mesh(jax.jit(jax.value_and_grad(loss_fn)), mesh)
    return jax.device_get(fn(params, steps.to_global(batch, shardings)))


@pytest.mark.parametrize("dispatcher,axes", [("alltoall", dict(data=2, expert=4)),
                                             ("einsum", dict(fsdp=2, expert=2, tensor=2)),
                                             ("dropless", dict(data=2, expert=4))])
def test_sharded_moe_model_matches_one_device(dispatcher, axes):
    """Loss (with router losses) and gradients of the whole model equal the 1-device reference dispatcher."""
    config = moe_tiny(dispatcher="reference", eval_capacity_factor=4.0)
    one = mesh_of(jax.devices()[:1])
    params = jax.device_get(init_params(config, make_setup(config, one), seed=0))
    batch = random_batch(config)
    loss_ref, grads_ref = _loss_and_grads(config, one, params, batch)
    config.moe.dispatcher = dispatcher
    loss, grads = _loss_and_grads(config, mesh_of(**axes), params, batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=2e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(np.abs(b).max(), 1e-3), err_msg=jax.tree_util.keystr(path))


def test_active_flops_count_top_k_experts():
    config = moe_tiny()
    m = config.model
    attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    ffn = 3 * m.d_model * m.mlp_dim
    want = m.num_layers * (attn + 2 * ffn + m.d_model * 4) + m.d_model * m.vocab_size
    assert matmul_params(m, config.moe) == want


def _config(data_dir, **train_overrides):
    config = load_config(os.path.join(REPO, "configs/demo_moe.py:tiny"))
    config.data.data_dir = data_dir
    config.train.update(peak_flops=1e11, **train_overrides)
    return config


def test_moe_trains_checkpoints_and_resumes(demo_data_dir, tmp_path):
    """Loss falls with router metrics logged; resuming from a mid-run checkpoint reproduces the losses."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = _config(demo_data_dir, steps=16, log_every=1, eval_every=16, checkpoint_every=8, keep_checkpoints=3)
    train.run(config, str(full))
    records = read_metrics(full)
    losses = {m["step"]: m["loss"] for m in records if "loss" in m}
    assert losses[16] < losses[1] - 1.0
    router = [m for m in records if "moe/expert_usage" in m]
    assert len(router) == 16
    usage = np.array(router[-1]["moe/expert_usage"])
    assert usage.shape == (2, 4) and np.allclose(usage.sum(-1), 1.0, atol=1e-4)
    assert all(0.9 < v < 2.0 for v in router[-1]["moe/load_balance_loss"])
    shutil.copytree(full / "checkpoints" / "8", resumed / "checkpoints" / "8")
    train.run(config, str(resumed))
    again = {m["step"]: m["loss"] for m in read_metrics(resumed) if "loss" in m}
    assert again == {s: v for s, v in losses.items() if s > 8}


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 5, "must be in [1, num_experts=4]"),
    ("train_capacity_factor", 0.0, "must be > 0"),
    ("eval_capacity_factor", -1.0, "must be > 0"),
    ("dispatcher", "megablox", "unknown dispatcher"),
    ("group_size", 24, "does not divide data.seq_len"),
    ("moe_every", 3, "does not divide model.num_layers"),
])
def test_bad_moe_config(field, value, message):
    config = moe_tiny(**{field: value})
    with pytest.raises(ConfigError, match=f"config.moe.{field}") as err:
        validate(config)
    assert message in str(err.value) and "fix:" in str(err.value)


def test_experts_not_divisible_over_expert_axis():
    config = moe_tiny()
    config.moe.num_experts = 6
    config.mesh.update(data=2, expert=4)
    with pytest.raises(ConfigError, match="config.moe.num_experts: 6 does not split over the 'expert' mesh axis"):
        sharding.check_divisible(config, mesh_of(data=2, expert=4))

"""Sharded equals unsharded: loss, gradients and one optimizer step on several meshes."""
import jax
import numpy as np
import pytest

from btx_jax import steps
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, tiny_config

MESHES = {
    "data8": dict(data=8),
    "data2_fsdp4": dict(data=2, fsdp=4),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _loss_and_grads(config, mesh, params_host, batch):
    setup = make_setup(config, mesh)
    params = jax.device_put(params_host, jax.tree.map(lambda a: a.sharding, setup.abstract_params))
    shardings = steps.batch_shardings(mesh)

    def loss_fn(p, b):
        return steps.lm_loss(steps.forward(setup.graphdef, p, b)[0], b)[0]

    fn = steps._under_mesh(jax.jit(jax.value_and_grad(loss_fn)), mesh)
    loss, grads = fn(params, steps.to_global(batch, shardings))
    config.optim.z_loss = 1e-4
    train_step = steps.make_train_step(setup, shardings, config)
    state, metrics = train_step(setup.init_state(params), steps.to_global(batch, shardings))
    return jax.device_get((loss, grads, metrics["loss"], state["params"]))


@pytest.fixture(scope="module")
def reference():
    config = tiny_config()
    mesh1 = mesh_of(jax.devices()[:1])
    params = jax.device_get(init_params(config, make_setup(config, mesh1), seed=0))
    batch = random_batch(config)
    return config, params, batch, _loss_and_grads(config, mesh1, params, batch)


@pytest.mark.parametrize("axes", MESHES.values(), ids=MESHES.keys())
def test_sharded_matches_single_device(reference, axes):
    config, params, batch, (loss1, grads1, step_loss1, new_params1) = reference
    loss, grads, step_loss, new_params = _loss_and_grads(config, mesh_of(**axes), params, batch)
    np.testing.assert_allclose(loss, loss1, rtol=2e-6)
    np.testing.assert_allclose(step_loss, step_loss1, rtol=2e-6)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-6)
    # Adam's first update is ~lr * sign(g): where |g| ~ float noise the sign can differ, so the
    # updated params are compared to a fraction of lr (3e-3), not to float precision.
    for p, p1 in zip(jax.tree.leaves(new_params), jax.tree.leaves(new_params1)):
        np.testing.assert_allclose(p, p1, rtol=1e-4, atol=1e-4)


def test_params_are_sharded_as_the_rules_say():
    """The stacked kernels carry the layer axis first and their logical axes after it."""
    config = tiny_config()
    setup = make_setup(config, mesh_of(data=2, fsdp=2, tensor=2))
    specs = jax.tree.map(lambda a: tuple(a.sharding.spec), setup.abstract_params)
    assert specs["layers"]["mlp"]["gate"]["kernel"] == (None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["down"]["kernel"] == (None, "tensor", "fsdp")
    assert specs["layers"]["attn"]["q"]["kernel"] == (None, "fsdp", "tensor", None)
    assert specs["embed"]["embedding"] == ("tensor", "fsdp")
    sharded = init_params(config, setup, seed=0)
    gate = sharded["layers"]["mlp"]["gate"]["kernel"]
    assert gate.addressable_shards[0].data.shape == (2, 32, 64)  # (L, D/fsdp, F/tensor)


def test_init_is_the_same_on_every_mesh():
    config = tiny_config()
    a = jax.device_get(init_params(config, make_setup(config, mesh_of(jax.devices()[:1])), seed=3))
    b = jax.device_get(init_params(config, make_setup(config, mesh_of(data=2, fsdp=2, tensor=2)), seed=3))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_multislice_mesh_puts_only_the_data_axis_across_slices():
    """Two 4-device slices: the data axis (size 2) crosses slices, fsdp stays inside each slice."""
    import dataclasses

    from btx_jax.config import ConfigError
    from btx_jax.sharding import multislice_grid

    @dataclasses.dataclass(frozen=True)
    class FakeDevice:
        id: int
        slice_index: int
        process_index: int = 0
        platform: str = "cpu"
        device_kind: str = "cpu"

    devices = [FakeDevice(i, i // 4) for i in range(8)]
    grid = multislice_grid({"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}, devices)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert grid.shape == (2, 4, 1, 1)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    assert sorted(d.id for d in grid.ravel()) == list(range(8))
    with pytest.raises(ConfigError, match="mesh.data"):
        multislice_grid({"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, devices)

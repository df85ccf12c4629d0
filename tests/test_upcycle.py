"""Upcycling variants of the surgeon (mix.upcycle): Drop-Upcycling against numpy (which dims, the same across
gate/up/down, the rest bit-identical, the statistics of the re-drawn part, different experts, independent of the
tiling), the config checks, and the recipe's drop_upcycle baseline stages; granular experts (mix.granularity):
the parts of the FFN, the dense model's logits at init, tiles inside a part."""
import jax
import numpy as np
import pytest
from etils import epath

from btx_jax import config as config_lib, graph, mix
from btx_jax.mix import tile_math
from btx_jax.mix.plan import MixError
from helpers import tiny_config
from test_mix import dense_params, load_merged, write_checkpoint

E = 4


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    params = dense_params(tiny_config(num_layers=3))
    write_checkpoint(root / "seed", params)
    return root / "seed", params


def upcycle_config(seed_path, out, **mix_overrides):
    c = tiny_config(num_layers=3)
    c.moe.update(num_experts=E, group_size=16, eval_capacity_factor=2.0)
    c.mix.update(experts="", seed=str(seed_path), seed_expert=False, copies=True, output=str(out),
                 upcycle="drop", drop_ratio=0.5, noise_seed=3)
    c.mix.update(**mix_overrides)
    return c


def dropped_dims(kernel, original, axis):
    """Intermediate dims where `kernel` differs from `original` anywhere (axis: the F axis of the matrix)."""
    other = 1 - axis
    return np.flatnonzero((kernel != original).any(axis=other))


@pytest.fixture(scope="module")
def dropped(seed, tmp_path_factory):
    seed_path, params = seed
    out = tmp_path_factory.mktemp("drop") / "out"
    config = upcycle_config(seed_path, out)
    manifest = mix.run(config)
    return config, params, load_merged(config, out), manifest


def test_drop_reinitializes_ratio_of_dims_consistently(dropped):
    """Exactly r*F dims per (layer, expert) re-drawn, the same dims in gate, up and down, the rest bit-identical
    to the seed's FFN; the dims are the seeded ones (drop_indices), different for every expert and layer."""
    config, params, got, manifest = dropped
    assert manifest["upcycle"] == "drop" and manifest["drop_ratio"] == 0.5
    experts, mlp = got["layers"]["moe"]["experts"], params["layers"]["mlp"]
    layers, width = mlp["gate"]["kernel"].shape[0], mlp["gate"]["kernel"].shape[2]
    k = width // 2
    subsets = {}
    for layer in range(layers):
        for e in range(E):
            gate, up = experts["gate"]["kernel"][layer, e], experts["up"]["kernel"][layer, e]  # [D, F]
            down = experts["down"]["kernel"][layer, e]  # [F, D]
            want = tile_math.drop_indices(config.mix.noise_seed, layer, e, width, 0.5)
            assert want.size == k
            np.testing.assert_array_equal(dropped_dims(gate, mlp["gate"]["kernel"][layer], 1), want)
            np.testing.assert_array_equal(dropped_dims(up, mlp["up"]["kernel"][layer], 1), want)
            np.testing.assert_array_equal(dropped_dims(down, mlp["down"]["kernel"][layer], 0), want)
            kept = np.setdiff1d(np.arange(width), want)
            np.testing.assert_array_equal(gate[:, kept], mlp["gate"]["kernel"][layer][:, kept])
            np.testing.assert_array_equal(up[:, kept], mlp["up"]["kernel"][layer][:, kept])
            np.testing.assert_array_equal(down[kept], mlp["down"]["kernel"][layer][kept])
            # every element of a dropped dim is re-drawn (not only some)
            assert (gate[:, want] != mlp["gate"]["kernel"][layer][:, want]).all()
            assert (down[want] != mlp["down"]["kernel"][layer][want]).all()
            subsets[layer, e] = tuple(want)
    assert len(set(subsets.values())) == len(subsets)  # different experts (and layers) get different subsets
    # everything that is not an expert is the seed's
    np.testing.assert_array_equal(got["layers"]["attn"]["q"]["kernel"], params["layers"]["attn"]["q"]["kernel"])


def test_dropped_values_follow_the_original_statistics(dropped):
    """The re-drawn part ~ normal(mean, std) of the original layer matrix; different experts draw differently."""
    config, params, got, _ = dropped
    experts, mlp = got["layers"]["moe"]["experts"], params["layers"]["mlp"]
    width = mlp["gate"]["kernel"].shape[2]
    for name in ("gate", "up", "down"):
        for layer in range(mlp[name]["kernel"].shape[0]):
            original = mlp[name]["kernel"][layer].astype(np.float64)
            drawn = []
            for e in range(E):
                dims = tile_math.drop_indices(config.mix.noise_seed, layer, e, width, 0.5)
                kernel = experts[name]["kernel"][layer, e]
                drawn.append(kernel[dims] if name == "down" else kernel[:, dims].T)
            values = np.stack(drawn).astype(np.float64)  # [E, r*F, D]: 4 x 64 x 64 values
            assert abs(values.mean() - original.mean()) < 0.05 * original.std()
            assert abs(values.std() / original.std() - 1) < 0.03
            assert abs(np.mean(((values - values.mean()) / values.std()) ** 4) - 3) < 0.2  # normal kurtosis
            assert not np.array_equal(values[0, :8], values[1, :8])


def test_drop_is_independent_of_tiling(seed, dropped, tmp_path):
    """The seed saved sharded over both matrix axes (4 chunks per layer matrix) with a tiny memory budget (one
    chunk per tile: each tile holds a quarter of a layer's matrix) writes exactly what one tile per leaf wrote
    (same dims, same values, same statistics); noise_seed matters."""
    _, params = seed
    _, _, whole, _ = dropped
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))

    def within_layer(a):
        spec = jax.sharding.PartitionSpec(None, "a", "b") if a.ndim == 3 else jax.sharding.PartitionSpec()
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    write_checkpoint(tmp_path / "sharded", jax.tree.map(within_layer, params))
    tiled = upcycle_config(tmp_path / "sharded", tmp_path / "tiled", memory_budget=1e-6)
    manifest = mix.run(tiled)
    # the same merge from the seed as first saved (one chunk per leaf): the sharded save cut each of the 3 FFN
    # leaves into 4 chunks, each a quarter of every layer, so 3 more tiles per FFN leaf and no others
    unsharded = mix.run(upcycle_config(seed[0], tmp_path / "unsharded", memory_budget=1e-6))
    assert manifest["tiles"] - unsharded["tiles"] == 3 * (4 - 1), (manifest["tiles"], unsharded["tiles"])
    got = load_merged(tiled, tmp_path / "tiled")
    for name in ("gate", "up", "down"):
        np.testing.assert_array_equal(got["layers"]["moe"]["experts"][name]["kernel"],
                                      whole["layers"]["moe"]["experts"][name]["kernel"])
    other = upcycle_config(seed[0], tmp_path / "other", noise_seed=4)
    mix.run(other)
    assert not np.array_equal(load_merged(other, tmp_path / "other")["layers"]["moe"]["experts"]["gate"]["kernel"],
                              whole["layers"]["moe"]["experts"]["gate"]["kernel"])


def test_stats_of_a_split_matrix_equal_the_whole():
    """row_moments over column blocks add up to the whole matrix's; with_drop on a box equals the same box of the
    whole-matrix result (values drawn per element, not per tile)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.1, 0.5, (2, 16, 40)).astype(np.float32)
    s, q, n = tile_math.row_moments(x)
    parts = [tile_math.row_moments(x[:, :, a:a + 8]) for a in range(0, 40, 8)]
    np.testing.assert_allclose(sum(p[0] for p in parts), s, rtol=1e-10)
    np.testing.assert_allclose(sum(p[1] for p in parts), q, rtol=1e-10)
    assert sum(p[2] for p in parts) == n == 16 * 40
    from btx_jax.mix.plan import LeafPlan
    from ml_collections import ConfigDict
    for target, shape in (("layers/moe/experts/gate/kernel", (2, 16, 40)),
                          ("layers/moe/experts/down/kernel", (2, 40, 16))):
        plan = LeafPlan(target, (shape[0], E, *shape[1:]), "float32", "stack", "", "stack", ["seed"] * E)
        src = rng.normal(0, 1, shape).astype(np.float32)
        m = ConfigDict(dict(noise_seed=1, drop_ratio=0.25))
        stats = (np.array([0.0, 1.0]), np.array([1.0, 2.0]))
        full = tuple(slice(0, n) for n in shape)
        whole = tile_math.with_drop(src, plan, full, 1, 2, m, stats)
        box = (slice(1, 2), *(slice(4, 12) if n == 16 else slice(8, 24) for n in shape[1:]))
        np.testing.assert_array_equal(tile_math.with_drop(src[box], plan, box, 1, 2, m, stats), whole[box])


def test_hashed_normal_is_standard_normal():
    z = tile_math.hashed_normal(12345, np.arange(200_000, dtype=np.uint64)).astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z ** 4) - 3) < 0.05
    np.testing.assert_array_equal(tile_math.hashed_normal(12345, np.arange(100, 200, dtype=np.uint64)), z[100:200]
                                  .astype(np.float32))
    assert not np.array_equal(tile_math.hashed_normal(1, np.arange(10, dtype=np.uint64)), z[:10].astype(np.float32))


def test_copy_and_noise_keep_their_meaning(seed, tmp_path):
    """upcycle=copy (the default) with copy_noise=0: exact copies; upcycle=noise = copy with copy_noise."""
    seed_path, params = seed
    assert config_lib.base_config().mix.upcycle == "copy"
    c = upcycle_config(seed_path, tmp_path / "copy", upcycle="copy")
    mix.run(c)
    got = load_merged(c, tmp_path / "copy")["layers"]["moe"]["experts"]["gate"]["kernel"]
    for e in range(E):
        np.testing.assert_array_equal(got[:, e], params["layers"]["mlp"]["gate"]["kernel"])
    a = upcycle_config(seed_path, tmp_path / "noise", upcycle="noise", copy_noise=0.01)
    b = upcycle_config(seed_path, tmp_path / "legacy", upcycle="copy", copy_noise=0.01)
    mix.run(a)
    mix.run(b)
    np.testing.assert_array_equal(load_merged(a, tmp_path / "noise")["layers"]["moe"]["experts"]["up"]["kernel"],
                                  load_merged(b, tmp_path / "legacy")["layers"]["moe"]["experts"]["up"]["kernel"])


@pytest.mark.parametrize("overrides, field", [
    (dict(upcycle="sparse"), "mix.upcycle"),
    (dict(upcycle="noise", copy_noise=0.0), "mix.copy_noise"),
    (dict(upcycle="drop", copy_noise=0.01), "mix.copy_noise"),
    (dict(upcycle="drop", drop_ratio=1.5), "mix.drop_ratio"),
])
def test_bad_upcycle_config_is_refused(overrides, field):
    c = tiny_config()
    c.mix.update(**overrides)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, check_paths=False)
    assert e.value.args[0] == field or field in str(e.value)


def test_drop_without_copies_is_refused(seed, tmp_path):
    """BTX's experts (one per source) are not copies: drop refuses, naming the fix; nothing is written."""
    seed_path, _ = seed
    c = upcycle_config(seed_path, tmp_path / "out", experts=",".join([str(seed_path)] * 3), seed_expert=True,
                       copies=False)
    with pytest.raises(MixError, match="no expert is a copy"):
        mix.run(c)
    assert not (tmp_path / "out").exists()


def test_recipe_has_the_drop_upcycle_baseline(tmp_path):
    config = config_lib.load_config("configs/btx_demo.py:tiny")
    config.recipe.update(baselines="upcycle,drop_upcycle", variants="")
    stages = {s.name: s for s in graph.trial_stages(config, lambda name: epath.Path(tmp_path) / name, ["a", "b"])}
    drop_mix, up_mix = stages["baseline/drop_upcycle_mix"], stages["baseline/upcycle_mix"]
    assert drop_mix.config.mix.upcycle == "drop" and drop_mix.config.mix.copies and drop_mix.config.mix.copy_noise == 0
    assert drop_mix.config.mix.experts == "" and drop_mix.inputs == ["seed"]
    assert stages["baseline/drop_upcycle"].inputs == ["baseline/drop_upcycle_mix"]
    assert (stages["baseline/drop_upcycle"].config.train.steps == stages["baseline/upcycle"].config.train.steps)
    assert stages["baseline/drop_upcycle"].config.train.init_from.endswith("baseline/drop_upcycle_mix/checkpoint")
    assert up_mix.config.mix.upcycle == "copy"  # the sparse upcycling baseline keeps its meaning


def granular_config(seed_path, out, g=2, copies=2, k=1, **mix_overrides):
    c = tiny_config(num_layers=3, mlp_dim=128 // g)
    c.moe.update(num_experts=g * copies, top_k=g * k, dispatcher="dropless", expert_dropout=0.0)
    c.mix.update(experts="", seed=str(seed_path), seed_expert=False, copies=True, output=str(out), granularity=g,
                 router_init="normal", router_std=0.5)
    c.mix.update(**mix_overrides)
    return c


def test_granular_experts_split_the_ffn_and_reproduce_dense_logits(seed, tmp_path):
    """granularity=2, 4 copies -> 8 experts of width F/2, top-4: expert e = part e % 2 of the seed's FFN (down
    scaled by 2), a copy's two router columns equal; the MoE's logits equal the dense seed's."""
    from btx_jax import steps
    from helpers import mesh_of, random_batch
    from btx_jax.state import make_setup

    seed_path, params = seed
    g = 2
    config = granular_config(seed_path, tmp_path / "out", g=g, copies=4, k=2)
    manifest = mix.run(config)
    assert manifest["granularity"] == g
    got = load_merged(config, tmp_path / "out")
    experts, mlp = got["layers"]["moe"]["experts"], params["layers"]["mlp"]
    width = 128 // g
    for e in range(8):
        part = slice((e % g) * width, (e % g + 1) * width)
        np.testing.assert_array_equal(experts["gate"]["kernel"][:, e], mlp["gate"]["kernel"][:, :, part])
        np.testing.assert_array_equal(experts["up"]["kernel"][:, e], mlp["up"]["kernel"][:, :, part])
        np.testing.assert_array_equal(experts["down"]["kernel"][:, e], g * mlp["down"]["kernel"][:, part])
    router = got["layers"]["moe"]["router"]["kernel"]  # [L, D, E]
    np.testing.assert_array_equal(router[..., 0::2], router[..., 1::2])
    assert not np.array_equal(router[..., 0], router[..., 2])

    dense = tiny_config(num_layers=3)
    batch = random_batch(dense)
    mesh = mesh_of(jax.devices()[:1])

    def logits(cfg, p):
        setup = make_setup(cfg, mesh)
        fn = steps._under_mesh(jax.jit(lambda q, b: steps.forward(setup.graphdef, q, b)[0]), mesh)
        return np.asarray(fn(p, batch))

    real = batch["segment_ids"] != 0
    want = logits(dense, params)[real]
    np.testing.assert_allclose(logits(config, got)[real], want, rtol=1e-5, atol=1e-5)


def test_granular_tiles_inside_a_layer_write_what_one_tile_writes(seed, tmp_path):
    """Sources chunked within each layer matrix (4 chunks, 2 along F) with a tiny budget, g = 2 (a part = a chunk)
    and g = 4 (a part = half a chunk): every expert is its part of the seed's FFN."""
    _, params = seed
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))

    def within_layer(a):
        spec = jax.sharding.PartitionSpec(None, "a", "b") if a.ndim == 3 else jax.sharding.PartitionSpec()
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    write_checkpoint(tmp_path / "sharded", jax.tree.map(within_layer, params))
    for g in (2, 4):
        tiled = granular_config(tmp_path / "sharded", tmp_path / f"tiled{g}", g=g, memory_budget=1e-6)
        manifest = mix.run(tiled)
        got = load_merged(tiled, tmp_path / f"tiled{g}")["layers"]["moe"]["experts"]
        mlp, width = params["layers"]["mlp"], 128 // g
        for e in range(g * 2):
            part = slice((e % g) * width, (e % g + 1) * width)
            np.testing.assert_array_equal(got["gate"]["kernel"][:, e], mlp["gate"]["kernel"][..., part])
            np.testing.assert_array_equal(got["down"]["kernel"][:, e], g * mlp["down"]["kernel"][:, part])
        assert manifest["tiles"] > 3 * g


@pytest.mark.parametrize("overrides, match", [
    (dict(top_k=3), "multiples of 2"),
    (dict(num_experts=3), "multiples of 2"),
])
def test_bad_granular_config_is_refused(seed, tmp_path, overrides, match):
    c = granular_config(seed[0], tmp_path / "out")
    c.moe.update(**overrides)
    with pytest.raises((MixError, config_lib.ConfigError), match=match):
        mix.run(c)
    assert not (tmp_path / "out").exists()
    c = granular_config(seed[0], tmp_path / "out", upcycle="drop")
    with pytest.raises(config_lib.ConfigError, match="granularity"):
        mix.run(c)

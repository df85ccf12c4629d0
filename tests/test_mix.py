"""The checkpoint surgeon: merged leaves against numpy (float32 and bfloat16, cut into tiles), the upcycling
identity, round trip into training, bad input, interrupted writes, memory that stays within the budget
whatever the number of experts, two processes writing what one writes, and sources and output on GCS."""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from btx_jax import checkpoint, mix, steps, train
from btx_jax.mix import stream, tiles
from btx_jax.config import load_config
from btx_jax.metrics import read_metrics
from btx_jax.models import router as router_lib
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, subprocess_env, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFN = ("gate", "up", "down")


def write_checkpoint(path, params, step=7):
    """A dense checkpoint laid out as btx_jax.train writes it (params under state/)."""
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "checkpoints", str(step), "state"), {"params": params, "step": np.int32(step)})
    ckpt.wait_until_finished()


def dense_params(config, seed=0):
    return jax.device_get(init_params(config, make_setup(config, mesh_of(jax.devices()[:1])), seed))


def perturbed(params, seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (a + rng.normal(0, scale, a.shape)).astype(a.dtype), params)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A seed and three branches of it (seed + noise), tiny config."""
    root = tmp_path_factory.mktemp("sources")
    seed = dense_params(tiny_config())
    write_checkpoint(root / "seed", seed)
    experts = [perturbed(seed, i + 1) for i in range(3)]
    for i, params in enumerate(experts):
        write_checkpoint(root / f"expert{i}", params)
    return root, seed, experts


def mix_config(root, out, **mix_overrides):
    c = tiny_config()
    c.moe.update(num_experts=4, group_size=16, eval_capacity_factor=2.0)
    c.mix.update(experts=",".join(str(root / f"expert{i}") for i in range(3)), seed=str(root / "seed"),
                 seed_expert=True, output=str(out))
    c.mix.update(**mix_overrides)
    return c


def load_merged(config, path):
    return jax.device_get(checkpoint.load_params(str(path), make_setup(config, mesh_of(jax.devices()[:1])).abstract_params))


def test_merged_leaves_equal_numpy(sources, tmp_path):
    """stack (experts + seed), mean, weighted mean, take-seed and take-source rules, each against numpy."""
    root, seed, experts = sources
    policy = r"attn/q/=seed;attn/k/=source:1;attn/v/=weighted:0.5,0.3,0.2;lm_head=weighted:1,0,3"
    config = mix_config(root, tmp_path / "out", policy=policy, router_std=0.05)
    manifest = mix.run(config)
    got = load_merged(config, tmp_path / "out")
    for name in FFN:
        want = np.stack([e["layers"]["mlp"][name]["kernel"] for e in experts] + [seed["layers"]["mlp"][name]["kernel"]], 1)
        np.testing.assert_array_equal(got["layers"]["moe"]["experts"][name]["kernel"], want)
    attn = lambda p, n: p["layers"]["attn"][n]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(attn(got, "q"), attn(seed, "q"))
    np.testing.assert_array_equal(attn(got, "k"), attn(experts[1], "k"))
    np.testing.assert_allclose(attn(got, "v"), 0.5 * attn(experts[0], "v") + 0.3 * attn(experts[1], "v")
                               + 0.2 * attn(experts[2], "v"), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(attn(got, "o"), np.mean([attn(e, "o") for e in experts], 0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got["lm_head"]["kernel"], 0.25 * experts[0]["lm_head"]["kernel"]
                               + 0.75 * experts[2]["lm_head"]["kernel"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got["embed"]["embedding"], np.mean([e["embed"]["embedding"] for e in experts], 0),
                               rtol=1e-6, atol=1e-8)
    router = got["layers"]["moe"]["router"]["kernel"]
    assert router.shape == (2, 64, 4) and 0.04 < router.std() < 0.06
    assert manifest["leaves"]["layers/attn/q/kernel"]["rule"] == "seed"
    assert manifest["expert_sources"] == ["expert0", "expert1", "expert2", "seed"]
    assert [e["step"] for e in manifest["experts"]] == [7, 7, 7]
    assert json.load(open(tmp_path / "out" / "manifest.json"))["router_init"] == "normal"
    assert all(0 < d < 0.5 for d in manifest["branch_distances"].values())


def test_bfloat16_merge_equals_numpy(tmp_path):
    """bfloat16 sources: the stack is exact and the means are float32 sums rounded once to bfloat16,
    as numpy (ml_dtypes) computes them; the leaves are cut into several tiles (sources chunked by layer)."""
    config = tiny_config(num_layers=4, param_dtype="bfloat16", dtype="bfloat16")
    seed = dense_params(config)
    layer_mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("layers",))

    def by_layer(a):
        layers = "layers" if a.ndim >= 2 and a.shape[0] % 4 == 0 else None
        return jax.device_put(a, jax.sharding.NamedSharding(layer_mesh, jax.sharding.PartitionSpec(layers)))

    experts = [perturbed(seed, i + 1) for i in range(3)]
    write_checkpoint(tmp_path / "seed", jax.tree.map(by_layer, seed))
    for i, params in enumerate(experts):
        write_checkpoint(tmp_path / f"expert{i}", jax.tree.map(by_layer, params))
    mix_config_ = mix_config(tmp_path, tmp_path / "out", policy="attn/v/=weighted:0.5,0.3,0.2", memory_budget=1e-6)
    mix_config_.model.update(num_layers=4, param_dtype="bfloat16", dtype="bfloat16")
    manifest = mix.run(mix_config_, out=lambda *a: None)
    assert manifest["tiles"] > 30
    got = load_merged(mix_config_, tmp_path / "out")
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    for name in FFN:
        want = np.stack([p["layers"]["mlp"][name]["kernel"] for p in [*experts, seed]], 1)
        np.testing.assert_array_equal(f32(got["layers"]["moe"]["experts"][name]["kernel"]), f32(want))
    cases = [("layers/attn/v/kernel", [0.5, 0.3, 0.2]), ("layers/attn/q/kernel", [1 / 3] * 3),
             ("embed/embedding", [1 / 3] * 3)]
    for path, weights in cases:
        leaves = [functools.reduce(lambda t, k: t[k], path.split("/"), tree) for tree in [got, *experts]]
        total = np.float32(weights[0]) * f32(leaves[1])
        for w, leaf in zip(weights[1:], leaves[2:]):
            total += np.float32(w) * f32(leaf)
        assert leaves[0].dtype == jnp.bfloat16
        np.testing.assert_array_equal(f32(leaves[0]), f32(total.astype(jnp.bfloat16)), err_msg=path)


def test_tiles_cover_every_leaf_once():
    """The tile grid: whole source chunks, grown up to the budget, covering the leaf exactly once."""
    assert tiles.tile_shape((8, 2048, 5504), (8, 2048, 5504), 4, 10**6) == (8, 2048, 5504)  # one chunk, over budget
    assert tiles.tile_shape((48, 256, 1024), (6, 256, 1024), 8, 30 * 10**6) == (12, 256, 1024)
    assert tiles.tile_shape((48, 256, 1024), (6, 32, 1024), 8, 3 * 10**6) == (6, 32, 1024)
    assert tiles.tile_shape((12, 4, 8), (1, 4, 8), 4, 200, row_multiple=3) == (3, 4, 8)  # whole groups of moe_every
    covered = np.zeros((10, 7, 5), int)
    for box in tiles.boxes(covered.shape, (4, 7, 2)):
        covered[box] += 1
    assert (covered == 1).all()


def test_upcycling_copies_with_noise(sources, tmp_path):
    """No experts, only a seed: every expert is a copy of the seed FFN (copies after the first get noise)."""
    root, seed, _ = sources
    config = mix_config(root, tmp_path / "out", experts="", seed_expert=False, copy_noise=0.01)
    mix.run(config)
    got = load_merged(config, tmp_path / "out")
    stacked = got["layers"]["moe"]["experts"]["gate"]["kernel"]
    want = seed["layers"]["mlp"]["gate"]["kernel"]
    np.testing.assert_array_equal(stacked[:, 0], want)
    for e in range(1, 4):
        diff = stacked[:, e] - want
        assert 0.005 < diff.std() / want.std() < 0.02  # small noise, different for every copy
    np.testing.assert_array_equal(got["layers"]["attn"]["q"]["kernel"], seed["layers"]["attn"]["q"]["kernel"])


def test_zeros_router_is_uniform_and_spreads_choices(sources, tmp_path):
    """router_init=zeros: probabilities ~1/E, yet the top-k choices spread over all experts (an exact
    zero kernel ties every probability and top_k's tie-break sends every token to experts 0 and 1)."""
    root, _, _ = sources
    config = mix_config(root, tmp_path / "out", router_init="zeros")
    mix.run(config)
    kernel = load_merged(config, tmp_path / "out")["layers"]["moe"]["router"]["kernel"]  # [L, D, E]
    layers, d, num_experts = kernel.shape
    top_k = config.moe.top_k
    assert (num_experts, top_k) == (4, 2)
    x = np.random.default_rng(0).normal(size=(16, 128, d)).astype(np.float32)  # unit-RMS, like normed hidden states
    for layer in range(layers):
        routing = router_lib.route(jnp.asarray(x), jnp.asarray(kernel[layer]), jnp.ones(x.shape[:2], bool),
                                   top_k=top_k, renormalize=True)
        np.testing.assert_allclose(np.asarray(routing.probs), 1.0 / num_experts, atol=1e-3)
        share = np.bincount(np.asarray(routing.experts).ravel(), minlength=num_experts) / routing.experts.size
        assert np.all((0.5 / num_experts < share) & (share < 2.0 / num_experts)), (layer, share)


@pytest.mark.parametrize("router_init,every", [("normal", 1), ("zeros", 1), ("centroid", 1), ("normal", 2)])
def test_identical_copies_reproduce_dense_logits(router_init, every, tmp_path, demo_data_dir):
    """An MoE made of N copies of one dense model equals the dense model, whatever the router
    (and with moe_every=2, where the other layers stay dense)."""
    config = tiny_config()
    config.data.data_dir = demo_data_dir
    dense = dense_params(config, seed=3)
    for i in range(3):
        write_checkpoint(tmp_path / f"expert{i}", dense)
    moe_config = mix_config(tmp_path, tmp_path / "out", seed="", seed_expert=False, router_init=router_init,
                            domains="code,math,prose")
    moe_config.data.data_dir = demo_data_dir
    moe_config.moe.update(num_experts=3, moe_every=every)
    mix.run(moe_config)
    merged = load_merged(moe_config, tmp_path / "out")
    router = merged["layers"]["moe"]["router"]["kernel"]
    if router_init == "centroid":  # the columns differ by domain
        assert np.linalg.norm(router[:, :, 0] - router[:, :, 1]) > 1e-3
    batch = random_batch(config)
    mesh = mesh_of(jax.devices()[:1])

    def logits(cfg, params):
        setup = make_setup(cfg, mesh)
        fn = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b)[0]), mesh)
        return np.asarray(fn(params, batch))

    real = batch["segment_ids"] != 0  # padding tokens are not routed (their FFN output is 0 in an MoE)
    np.testing.assert_allclose(logits(moe_config, merged)[real], logits(config, dense)[real], rtol=1e-5, atol=1e-5)


def test_output_finetunes_in_train(sources, tmp_path, demo_data_dir, capsys):
    """init_from=<surgeon output> loads into the MoE config; a few finetuning steps lower the loss."""
    root, _, _ = sources
    out = tmp_path / "mixed"
    mix.run(mix_config(root, out))
    config = load_config(os.path.join(REPO, "configs/demo_moe.py:tiny"))
    config.data.data_dir = demo_data_dir
    config.train.update(steps=10, log_every=1, eval_every=10, checkpoint_every=10, init_from=str(out), peak_flops=1e11)
    train.run(config, str(tmp_path / "finetune"))
    assert "initialising params from" in capsys.readouterr().out
    losses = [m["loss"] for m in read_metrics(tmp_path / "finetune") if "loss" in m]
    assert losses[-1] < losses[0] - 0.5


def _nothing_written(out):
    parent = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not [d for d in os.listdir(parent) if "incomplete" in d]


@pytest.mark.parametrize("case", ["other_architecture", "wrong_num_experts", "missing_source", "existing_output",
                                  "copies_not_dividing", "bad_rule", "nan"])
def test_bad_input_is_refused_and_nothing_written(case, sources, tmp_path):
    root, seed, _ = sources
    out = tmp_path / "out"
    config = mix_config(root, out)
    if case == "other_architecture":
        other = tiny_config(mlp_dim=96)
        write_checkpoint(tmp_path / "odd", dense_params(other))
        config.mix.experts += f",{tmp_path / 'odd'}"
        config.moe.num_experts = 5
        message = "does not have the architecture of expert0"
    elif case == "wrong_num_experts":
        config.moe.num_experts = 5
        message = "config.moe.num_experts=5 but there are 4 FFN sources"
    elif case == "missing_source":
        config.mix.experts += f",{tmp_path / 'nowhere'}"
        message = "expert3 checkpoint not found"
    elif case == "existing_output":
        out.mkdir()
        message = "already exists"
    elif case == "copies_not_dividing":
        config.mix.update(copies=True)
        config.moe.num_experts = 6
        message = "with num_experts a multiple of 4"
    elif case == "bad_rule":
        config.mix.policy = "attn=median"
        message = "unknown rule 'median'"
    else:
        bad = perturbed(seed, 9)
        bad["layers"]["mlp"]["up"]["kernel"][0, 0, 0] = np.nan
        write_checkpoint(tmp_path / "nan", bad)
        config.mix.experts = f"{root / 'expert0'},{root / 'expert1'},{tmp_path / 'nan'}"
        message = "has NaN or Inf in layers/mlp/up/kernel"
    with pytest.raises(mix.MixError, match=message.replace("(", r"\(").replace("[", r"\[")):
        mix.run(config)
    if case == "existing_output":
        assert os.listdir(out) == []
    else:
        _nothing_written(str(out))


def test_interrupted_write_leaves_no_checkpoint(sources, tmp_path, monkeypatch):
    """A failure mid-stream removes the scratch directory; a stale one (a killed run) is not loadable
    and is cleared by the next run."""
    root, _, _ = sources
    out = tmp_path / "out"
    config = mix_config(root, out)
    calls = {"n": 0}
    real_make_tile = stream.make_tile

    async def failing_make_tile(tile, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        async for item in real_make_tile(tile, *args):
            yield item

    monkeypatch.setattr(stream, "make_tile", failing_make_tile)
    with pytest.raises(OSError, match="No space left"):
        mix.run(config)
    _nothing_written(str(out))
    monkeypatch.setattr(stream, "make_tile", real_make_tile)
    stale = tmp_path / ".out.incomplete"
    (stale / "checkpoint.partial_save").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.step_dir(str(stale))
    mix.run(config)
    assert os.path.isdir(out / "state") and not stale.exists()


TINY_MODEL = dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)


def write_config_file(path, root, out, model=TINY_MODEL, num_experts=4, **mix_overrides):
    """A config file for ``python -m btx_jax.mix``: the seed and three experts under `root`, seed expert on."""
    mix_fields = dict(experts=",".join(f"{root}/expert{i}" for i in range(3)), seed=f"{root}/seed", seed_expert=True,
                      output=str(out), **mix_overrides)
    path.write_text(
        "from btx_jax.config import base_config\n"
        "def get_config(variant=None):\n"
        "    c = base_config()\n"
        f"    c.model.update(**{model!r})\n"
        "    c.data.update(seq_len=32, batch_size=8)\n"
        f"    c.moe.update(num_experts={num_experts}, group_size=16)\n"
        f"    c.mix.update(**{mix_fields!r})\n"
        "    return c\n")
    return path


def run_cli(*args, env=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "btx_jax.mix", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_writes_nothing(sources, tmp_path):
    root, _, _ = sources
    out = tmp_path / "out"
    config_file = write_config_file(tmp_path / "mix.py", root, out)
    result = run_cli(f"--config={config_file}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "layers/moe/experts/gate/kernel" in result.stdout and "expert0,expert1,expert2,seed" in result.stdout
    assert "memory budget" in result.stdout
    assert not out.exists()
    bad = run_cli(f"--config={config_file}", "--config.moe.num_experts=3")
    assert bad.returncode == 2 and "error: config.moe.num_experts=3 but there are 4 FFN sources" in bad.stderr


def test_peak_memory_stays_within_the_budget_whatever_the_experts(tmp_path):
    """48 layers, float32: each source FFN leaf is 50 MB. E=4 (3 experts + the seed) and E=8 (the same four
    sources, each twice) merge the same sources, and their largest merged leaf is 200 MB and 400 MB; a
    merge that held a merged leaf would be above either. Streamed by tiles with a 200 MB budget, both
    peak at about the budget above the pre-merge baseline (measured alone: 0.9-1.05x), and E=8 at about
    E=4 (0.88-1.05x)."""
    model = dict(vocab_size=384, d_model=256, num_layers=48, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=1024)
    seed = dense_params(tiny_config(**model))
    write_checkpoint(tmp_path / "seed", seed)
    for i in range(3):
        write_checkpoint(tmp_path / f"expert{i}", perturbed(seed, i + 1, 0.001))
    del seed
    extra = {}
    for num_experts in (4, 8):
        out = tmp_path / f"out{num_experts}"
        config_file = write_config_file(tmp_path / f"mix{num_experts}.py", tmp_path, out, model, num_experts,
                                        copies=num_experts > 4, memory_budget=0.2)
        result = run_cli(f"--config={config_file}")
        assert result.returncode == 0, result.stderr
        manifest = json.load(open(out / "manifest.json"))
        assert manifest["largest_leaf_bytes"] == 48 * num_experts * 256 * 1024 * 4
        assert manifest["memory_budget_bytes"] == 200_000_000
        extra[num_experts] = manifest["peak_rss_bytes"] - manifest["rss_before_merge_bytes"]
        assert extra[num_experts] < 1.2 * 200e6, f"E={num_experts}: {extra[num_experts] / 1e6:.0f} MB above baseline"
    assert extra[8] < 1.25 * extra[4], f"E=8 {extra[8] / 1e6:.0f} MB, E=4 {extra[4] / 1e6:.0f} MB above the baseline"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(config_file, *args):
    """``python -m btx_jax.mix`` as one jax.distributed job of two processes with 4 CPU devices each."""
    port = _free_port()
    env = subprocess_env(4)
    procs = [subprocess.Popen([sys.executable, "-m", "btx_jax.mix", f"--config={config_file}", *args,
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # a process whose peer died can hang in jax.distributed and ignore SIGTERM
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)


def test_two_processes_write_what_one_process_writes(tmp_path):
    """One jax.distributed job of two processes (4 CPU devices each) writes one checkpoint, each process
    its share of the tiles; it equals a one-process run leaf by leaf, bit for bit (copy noise included).

    The sources are saved sharded over the layer axis, so every FFN leaf comes in 4 chunks (tiles): the
    two processes both write parts of every expert leaf."""
    config = tiny_config(num_layers=4)
    seed = dense_params(config)
    layer_mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("layers",))

    def by_layer(a):
        layers = "layers" if a.ndim >= 2 and a.shape[0] % 4 == 0 else None
        return jax.device_put(a, jax.sharding.NamedSharding(layer_mesh, jax.sharding.PartitionSpec(layers)))

    write_checkpoint(tmp_path / "seed", jax.tree.map(by_layer, seed))
    for i in range(3):
        write_checkpoint(tmp_path / f"expert{i}", jax.tree.map(by_layer, perturbed(seed, i + 1)))
    mix_fields = dict(copies=True, copy_noise=0.01, memory_budget=1e-6)  # E=8 = 4 sources x 2; one chunk per tile
    model = {**TINY_MODEL, "num_layers": 4}
    one = mix_config(tmp_path, tmp_path / "one", **mix_fields)
    one.model.num_layers = 4
    one.moe.num_experts = 8
    mix.run(one, out=lambda *a: None)

    config_file = write_config_file(tmp_path / "mix.py", tmp_path, tmp_path / "two", model, 8, **mix_fields)
    run_two_processes(config_file)
    manifest = json.load(open(tmp_path / "two" / "manifest.json"))
    assert manifest["processes"] == 2 and len(manifest["peak_rss_bytes_per_process"]) == 2
    assert min(manifest["tiles_per_process"]) > 10, manifest["tiles_per_process"]
    meta = checkpoint.param_metadata(str(tmp_path / "one"))
    assert meta == checkpoint.param_metadata(str(tmp_path / "two"))
    assert meta["layers/moe/experts/up/kernel"][0] == (4, 8, 64, 128)
    for name, (shape, dtype) in meta.items():
        want = checkpoint.read_param(str(tmp_path / "one"), name, shape, dtype)
        np.testing.assert_array_equal(checkpoint.read_param(str(tmp_path / "two"), name, shape, dtype), want,
                                      err_msg=name)
    gate_path = "layers/moe/experts/gate/kernel"
    gate = checkpoint.read_param(str(tmp_path / "two"), gate_path, *meta[gate_path])
    np.testing.assert_array_equal(gate[:, 3], seed["layers"]["mlp"]["gate"]["kernel"])  # 3 experts + seed, then copies
    assert 0 < np.std(gate[:, 7] - gate[:, 3]) < 0.1 * np.std(gate[:, 3])


def test_two_processes_centroid_router(sources, tmp_path, demo_data_dir):
    """Centroid init in a two-process job: both processes run the forward passes, each on its rows of the
    batches one process would use; the router matches the one-process router up to float summation
    order, and every other leaf is bit for bit the same."""
    root, _, _ = sources
    mix_fields = dict(router_init="centroid", domains="code,math,prose")
    one = mix_config(root, tmp_path / "one", **mix_fields)
    one.data.data_dir = demo_data_dir
    mix.run(one, out=lambda *a: None)
    config_file = write_config_file(tmp_path / "mix.py", root, tmp_path / "two", **mix_fields)
    run_two_processes(config_file, f"--config.data.data_dir={demo_data_dir}", "--config.moe.eval_capacity_factor=2.0")
    meta = checkpoint.param_metadata(str(tmp_path / "one"))
    for name, (shape, dtype) in meta.items():
        want = checkpoint.read_param(str(tmp_path / "one"), name, shape, dtype)
        got = checkpoint.read_param(str(tmp_path / "two"), name, shape, dtype)
        if name == "layers/moe/router/kernel":
            assert np.linalg.norm(want[:, :, 0] - want[:, :, 1]) > 1e-3  # columns differ by domain
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """``gs://mixbucket`` on a local GCS emulator (tests/gcs_emulator.py), for the module's tests."""
    import gcs_emulator

    with gcs_emulator.running(tmp_path_factory.mktemp("gcs"), "mixbucket") as url:
        yield url


def test_sources_and_output_in_gcs(bucket, sources, tmp_path, monkeypatch):
    """Sources and output given as gs:// URLs reach Orbax and tensorstore unchanged: the merged checkpoint
    lands in the bucket (nothing local, no 'gs:' directory) and equals the same merge written locally."""
    root, seed, experts = sources
    monkeypatch.chdir(tmp_path)
    for name, params in [("seed", seed), *((f"expert{i}", p) for i, p in enumerate(experts))]:
        write_checkpoint(f"{bucket}/src/{name}", params)
    local = mix_config(root, tmp_path / "local")
    mix.run(local, out=lambda *a: None)
    remote = mix_config(root, f"{bucket}/mixed")
    step = "checkpoints/7"  # step directories: on GCS a bare Orbax save has no step-level commit marker
    remote.mix.update(experts=",".join(f"{bucket}/src/expert{i}/{step}" for i in range(3)),
                      seed=f"{bucket}/src/seed/{step}")
    manifest = mix.run(remote, out=lambda *a: None)
    assert manifest["seed"]["path"] == f"{bucket}/src/seed/checkpoints/7"
    assert epath.Path(f"{bucket}/mixed/manifest.json").exists() and epath.Path(f"{bucket}/mixed/state").is_dir()
    assert not list(epath.Path(bucket).glob(".mixed.incomplete*")) and not os.path.exists(tmp_path / "gs:")
    meta = checkpoint.param_metadata(f"{bucket}/mixed")
    assert meta == checkpoint.param_metadata(str(tmp_path / "local"))
    for name, (shape, dtype) in meta.items():
        np.testing.assert_array_equal(checkpoint.read_param(f"{bucket}/mixed", name, shape, dtype),
                                      checkpoint.read_param(str(tmp_path / "local"), name, shape, dtype), err_msg=name)

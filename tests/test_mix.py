"""The checkpoint surgeon: merged leaves against numpy, the upcycling identity, round trip into
training, bad input, interrupted writes and bounded memory."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from btx_jax import checkpoint, mix, steps, train
from btx_jax.config import load_config
from btx_jax.metrics import read_metrics
from btx_jax.models import router as router_lib
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, random_batch, tiny_config

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
    real_merge = mix.merge_leaf

    def failing_merge(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(mix, "merge_leaf", failing_merge)
    with pytest.raises(OSError, match="No space left"):
        mix.run(config)
    _nothing_written(str(out))
    monkeypatch.setattr(mix, "merge_leaf", real_merge)
    stale = tmp_path / ".out.incomplete"
    (stale / "checkpoint.partial_save").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.step_dir(str(stale))
    mix.run(config)
    assert os.path.isdir(out / "state") and not stale.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(sources, tmp_path):
    root, _, _ = sources
    out = tmp_path / "out"
    config_file = tmp_path / "mix.py"
    config_file.write_text(
        "from btx_jax.config import base_config\n"
        "def get_config(variant=None):\n"
        "    c = base_config()\n"
        "    c.model.update(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)\n"
        "    c.data.update(seq_len=32, batch_size=8)\n"
        "    c.moe.update(num_experts=4, group_size=16)\n"
        f"    c.mix.update(experts='{root}/expert0,{root}/expert1,{root}/expert2', seed='{root}/seed',\n"
        f"                 seed_expert=True, output='{out}')\n"
        "    return c\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "btx_jax.mix", f"--config={config_file}", "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "layers/moe/experts/gate/kernel" in result.stdout and "expert0,expert1,expert2,seed" in result.stdout
    assert not out.exists()
    bad = subprocess.run([sys.executable, "-m", "btx_jax.mix", f"--config={config_file}", "--config.moe.num_experts=3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: config.moe.num_experts=3 but there are 4 FFN sources" in bad.stderr


def test_peak_memory_is_bounded_by_the_largest_leaf(tmp_path):
    """48 layers: the output is 0.6 GB and the four sources 0.8 GB, the largest merged leaf 0.2 GB;
    peak RSS above the pre-merge baseline stays under 3.5x that leaf.

    What this guards is streaming: a merge that held the output or the sources would be above 7x
    the leaf here. Alone the surgeon peaks at 2.6-2.8x (the output leaf, the sources read ahead, and
    Orbax's write buffers); with the other test worker loading the machine, the async reads and
    writes overlap differently and 3.04x was seen, so 3x (BENCH.md's goal, which bench/mix.py
    measures on an idle machine) would make this test flaky."""
    config = tiny_config(d_model=256, num_layers=48, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=1024)
    seed = dense_params(config)
    write_checkpoint(tmp_path / "seed", seed)
    for i in range(3):
        write_checkpoint(tmp_path / f"expert{i}", perturbed(seed, i + 1, 0.001))
    del seed
    config_file = tmp_path / "mix.py"
    config_file.write_text(
        "from btx_jax.config import base_config\n"
        "def get_config(variant=None):\n"
        "    c = base_config()\n"
        "    c.model.update(vocab_size=384, d_model=256, num_layers=48, num_heads=4, num_kv_heads=4, head_dim=64,"
        " mlp_dim=1024)\n"
        "    c.data.update(seq_len=32, batch_size=8)\n"
        "    c.moe.update(num_experts=4, group_size=16)\n"
        f"    c.mix.update(experts='{tmp_path}/expert0,{tmp_path}/expert1,{tmp_path}/expert2', seed='{tmp_path}/seed',\n"
        f"                 seed_expert=True, output='{tmp_path / 'out'}')\n"
        "    return c\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "btx_jax.mix", f"--config={config_file}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    leaf = manifest["largest_leaf_bytes"]
    assert leaf == 48 * 4 * 256 * 1024 * 4
    extra = manifest["peak_rss_bytes"] - manifest["rss_before_merge_bytes"]
    assert extra < 3.5 * leaf, f"peak RSS {extra / 1e9:.2f} GB above baseline, largest leaf {leaf / 1e9:.2f} GB"

"""End-to-end training: loss falls, kill/resume is exact, restore onto another mesh, init_from."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from btx_jax import checkpoint, train
from btx_jax.config import load_config
from btx_jax.metrics import read_metrics
from btx_jax.state import init_params, make_setup
from helpers import mesh_of, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subprocess_env()


def tiny(data_dir, **train_overrides):
    config = load_config(os.path.join(REPO, "configs/demo_dense.py:tiny"))
    config.data.data_dir = data_dir
    config.train.update(peak_flops=1e11, **train_overrides)
    config.optim.warmup_steps = min(config.optim.warmup_steps, config.train.steps - 1)
    return config


def cli_args(data_dir, workdir, **train_overrides):
    args = [sys.executable, "-m", "btx_jax.train", "--config", "configs/demo_dense.py:tiny",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", "--config.train.peak_flops=1e11"]
    return args + [f"--config.train.{k}={v}" for k, v in train_overrides.items()]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def test_loss_falls_on_demo_corpus(demo_data_dir, tmp_path):
    """A short run learns: train loss and every domain's held-out perplexity go down."""
    config = tiny(demo_data_dir, steps=60, eval_every=30, log_every=10)
    final = train.run(config, str(tmp_path))
    records = read_metrics(tmp_path)
    train_losses = [m["loss"] for m in records if "loss" in m]
    evals = [m for m in records if "eval/avg_loss" in m]
    assert train_losses[0] > 5.0  # ~log(vocab) at init
    assert train_losses[-1] < train_losses[0] - 2.0
    for domain in ("code", "math", "prose"):
        assert evals[-1][f"eval/{domain}/ppl"] < evals[0][f"eval/{domain}/ppl"]
    assert final["eval/avg_ppl"] < np.exp(train_losses[0]) / 5  # far better than the untrained model
    assert os.listdir(tmp_path / "tensorboard")
    assert {"perf/tokens_per_s", "perf/mfu", "grad_norm", "lr"} <= set(records[0])


@pytest.fixture(scope="module")
def reference_run(demo_data_dir, tmp_path_factory):
    """An uninterrupted 40-step CLI run, logging every step (checkpoints do not change the losses: one at the end)."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(cli_args(demo_data_dir, workdir, steps=40, log_every=1, checkpoint_every=40),
                   cwd=REPO, env=ENV, check=True, capture_output=True)
    return losses(workdir)


def _last_logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max([json.loads(line)["step"] for line in open(path) if line.strip()] or [0])


def _complete_checkpoints(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _start_and_signal(args, workdir, sig, ready):
    """Starts a CLI run and sends `sig` as soon as ready(workdir) holds."""
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        if ready(workdir):
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def test_sigkill_then_resume_reproduces_losses(demo_data_dir, tmp_path, reference_run):
    """Hard kill mid-run; rerunning resumes from the last complete checkpoint with the same data order."""
    args = cli_args(demo_data_dir, tmp_path, steps=40, log_every=1, checkpoint_every=4)
    code, _ = _start_and_signal(  # killed after a complete checkpoint and two more steps
        args, tmp_path, signal.SIGKILL,
        ready=lambda w: _complete_checkpoints(w) and _last_logged_step(w) >= _complete_checkpoints(w)[0] + 2)
    assert code == -signal.SIGKILL
    done = checkpoint.step_dir(str(tmp_path))
    assert int(os.path.basename(done)) < 40
    out = subprocess.run(args, cwd=REPO, env=ENV, check=True, capture_output=True, text=True).stdout
    assert f"resuming from step {os.path.basename(done)}" in out
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == reference_run  # exactly: same params, optimizer state and batches


def test_sigterm_saves_and_exits_cleanly(demo_data_dir, tmp_path, reference_run):
    """SIGTERM saves a checkpoint at the current step and exits; a rerun finishes identically."""
    args = cli_args(demo_data_dir, tmp_path, steps=40, log_every=1, checkpoint_every=100)
    code, out = _start_and_signal(args, tmp_path, signal.SIGTERM, ready=lambda w: _last_logged_step(w) >= 3)
    assert code == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out
    stopped = int(os.path.basename(checkpoint.step_dir(str(tmp_path))))
    assert 3 <= stopped < 40
    subprocess.run(args, cwd=REPO, env=ENV, check=True, capture_output=True)
    assert losses(tmp_path) == reference_run


def test_restore_onto_a_different_mesh(demo_data_dir, tmp_path):
    """A checkpoint written on data=8 restores onto data=2 x fsdp=2 x tensor=2 with the new shardings."""
    config = tiny(demo_data_dir, steps=4, checkpoint_every=4, eval_every=4)
    config.mesh.update(data=8)
    train.run(config, str(tmp_path))
    manager = checkpoint.make_manager(str(tmp_path), keep=3)
    saved = jax.device_get(checkpoint.restore(manager, 4, make_setup(config, mesh_of(data=8)).abstract_state(),
                                              _iterator(config))["params"])
    new_mesh = mesh_of(data=2, fsdp=2, tensor=2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    restored = checkpoint.restore(manager, 4, make_setup(config, new_mesh).abstract_state(), _iterator(config))
    kernel = restored["params"]["layers"]["mlp"]["gate"]["kernel"]
    assert kernel.sharding.mesh.shape == new_mesh.shape
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored["params"]))):
        np.testing.assert_array_equal(a, b)
    config.train.steps = 6
    train.run(config, str(tmp_path))  # and training continues on the new mesh
    assert max(losses(tmp_path)) == 6


def _iterator(config):
    from btx_jax.data import pipeline
    return pipeline.train_iterator(config.data, pipeline.open_sources(config.data, "train"))


def test_init_from_loads_params_with_a_fresh_optimizer(demo_data_dir, tmp_path, capsys):
    seed_dir, child_dir = tmp_path / "seed", tmp_path / "child"
    config = tiny(demo_data_dir, steps=3, checkpoint_every=3, eval_every=3)
    train.run(config, str(seed_dir))
    setup = make_setup(config, mesh_of())
    seed_params = jax.device_get(checkpoint.load_params(str(seed_dir), setup.abstract_params))
    child = tiny(demo_data_dir, steps=2, checkpoint_every=1, eval_every=2, init_from=str(seed_dir))
    child.mesh.update(data=2, fsdp=4)  # another mesh, too
    train.run(child, str(child_dir))
    assert "initialising params from" in capsys.readouterr().out
    manager = checkpoint.make_manager(str(child_dir), keep=3)
    child_setup = make_setup(child, mesh_of(data=2, fsdp=4))
    state = checkpoint.restore(manager, 1, child_setup.abstract_state(), _iterator(child))
    assert int(state["step"]) == 1  # the optimizer started at step 0
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(seed_params),
                                                 jax.tree.leaves(jax.device_get(state["params"])))]
    assert 0 < max(moved) < 0.05  # one small step away from the seed, not from a random init


@pytest.mark.parametrize("lr, warmup, steps, min_ratio", [(3e-3, 50, 300, 0.1), (1e-3, 0, 10, 0.0), (1e-3, 1, 3, 0.5),
                                                        (2e-4, 10, 11, 1.0)])
def test_schedule_is_optax_warmup_cosine_also_when_traced(lr, warmup, steps, min_ratio):
    """state.schedule (its numbers a train-step input) equals optax.warmup_cosine_decay_schedule with the
    same settings at every step and past the end, evaluated on the host and inside jit."""
    import optax
    from ml_collections import ConfigDict

    from btx_jax.state import schedule, schedule_numbers

    numbers = schedule_numbers(ConfigDict({"lr": lr, "warmup_steps": warmup, "min_lr_ratio": min_ratio}), steps)
    want = optax.warmup_cosine_decay_schedule(init_value=lr / (warmup + 1), peak_value=lr, warmup_steps=warmup,
                                              decay_steps=steps, end_value=lr * min_ratio)
    counts = np.arange(steps + 5)
    traced = jax.jit(jax.vmap(lambda n, c: schedule(n)(c), in_axes=(None, 0)))(numbers, counts)
    np.testing.assert_allclose([float(schedule(numbers)(c)) for c in counts], [float(want(c)) for c in counts],
                               rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(traced, [float(want(c)) for c in counts], rtol=1e-6, atol=1e-12)


def test_runs_that_differ_only_in_schedule_share_one_compiled_step():
    """Length, learning rate, warmup and the router losses' weights are inputs of the train step, not constants
    in it: a recipe's stages and variants (no load balance) and tests of other lengths reuse the compiled
    program. A real difference (the LM z-loss, the balancing form) still changes it."""
    from btx_jax import steps as steps_lib
    from helpers import random_batch, tiny_config

    def program(moe=None, train=None, **optim):
        steps_lib.clear_programs()  # a fresh trace each time, not the process's jitted step of an equal program
        config = tiny_config()
        config.optim.update(**{k: v for k, v in optim.items() if k != "steps"})
        config.train.steps = optim.get("steps", config.train.steps)
        config.train.update(**(train or {}))
        if moe is not None:
            config.moe.update(num_experts=4, top_k=2, dispatcher="einsum", **moe)
        mesh = mesh_of(jax.devices()[:2])
        setup = make_setup(config, mesh)
        shardings = steps_lib.batch_shardings(mesh)
        step = steps_lib.make_train_step(setup, shardings, config)
        return step.lower(setup.abstract_state(), steps_lib.to_global(random_batch(config), shardings)).as_text()

    base = program()
    assert program(steps=77, lr=1e-4, warmup_steps=7, min_lr_ratio=0.5) == base
    # the host-only fields of steps_lib.NOT_IN_PROGRAM
    assert program(train=dict(log_every=3, eval_every=5, eval_batches=9, checkpoint_every=4, keep_checkpoints=1,
                              init_from="/elsewhere", peak_flops=1e12)) == base
    assert program(z_loss=1e-3) != base
    moe = program(moe={})
    assert program(moe=dict(load_balance_weight=0.0, router_z_weight=0.1)) == moe
    assert program(moe=dict(balance="sequence")) != moe


def test_a_process_reuses_the_jitted_step_of_an_equal_program_with_its_own_schedule():
    """Stages that differ only in fields outside the program (steps_lib.NOT_IN_PROGRAM) get the jitted step made
    earlier in the process (no second trace), run with their own schedule and loss weights: the update equals
    that of a step made afresh. Any other difference (here Adam's b2) gets its own program."""
    from btx_jax import steps as steps_lib
    from helpers import random_batch, tiny_config

    mesh = mesh_of(jax.devices()[:2])
    shardings = steps_lib.batch_shardings(mesh)

    def config_of(**optim):
        config = tiny_config()
        config.optim.update(**optim)
        return config

    def one_step(config):
        setup = make_setup(config, mesh)
        state = setup.init_state(init_params(config, setup, seed=0))
        step = steps_lib.make_train_step(setup, shardings, config)
        new_state, metrics = step(state, steps_lib.to_global(random_batch(config), shardings))
        return jax.device_get(new_state["params"]), float(metrics["loss"])

    steps_lib.clear_programs()
    first = config_of(lr=1e-3, warmup_steps=2)
    other = config_of(lr=3e-2, warmup_steps=0)
    other.moe.update(load_balance_weight=0.5, router_z_weight=0.1)
    other.train.update(steps=11, log_every=1, init_from="/elsewhere")
    one_step(first)
    assert len(steps_lib._programs) == 1
    reused = one_step(other)
    assert len(steps_lib._programs) == 1  # the same jitted step
    steps_lib.clear_programs()
    fresh = one_step(other)
    assert reused[1] == fresh[1]
    jax.tree.map(np.testing.assert_array_equal, reused[0], fresh[0])
    untouched = one_step(first)[0]  # the same program again, with the first schedule: another update
    assert len(steps_lib._programs) == 1
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(untouched), jax.tree.leaves(fresh[0])))
    one_step(config_of(lr=1e-3, warmup_steps=2, b2=0.99))
    assert len(steps_lib._programs) == 2


def test_cross_entropy_and_its_hand_written_gradient_match_numpy():
    """lm_loss (token_nll's custom VJP) against the analytic loss and gradient in float64 numpy:
    d/dlogits = (softmax - one_hot(target) + 2 z log Z softmax) * mask / tokens."""
    from btx_jax.steps import lm_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) < 0.7).astype(np.float32)
    z = 1e-2
    batch = {"targets": jax.numpy.asarray(targets), "loss_mask": jax.numpy.asarray(mask)}
    (loss, metrics), grad = jax.value_and_grad(lambda x: lm_loss(x, batch, z), has_aux=True)(logits)

    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    softmax = np.exp(x - log_z[..., None])
    one_hot = np.eye(11)[targets]
    tokens = mask.sum()
    nll = log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(metrics["loss"], (nll * mask).sum() / tokens, rtol=1e-6)
    np.testing.assert_allclose(loss, (nll * mask).sum() / tokens + z * (log_z**2 * mask).sum() / tokens, rtol=1e-6)
    expected = (softmax - one_hot + 2 * z * log_z[..., None] * softmax) * mask[..., None] / tokens
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_saving_small_replicated_arrays_compiles_nothing(tmp_path, caplog):
    """Orbax's replica-parallel save compiles a slice program per device and shape of every replicated array;
    arrays under 1 MiB per replica are written whole by one replica instead (btx_jax.checkpoint), and restore."""
    import logging

    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = mesh_of(data=8)
    value = jax.device_put(np.arange(64 * 37, dtype=np.float32).reshape(64, 37), NamedSharding(mesh, P()))
    checkpointer = ocp.StandardCheckpointer()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        checkpointer.save(tmp_path / "small", {"x": value})
        checkpointer.wait_until_finished()
    assert not [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    restored = checkpointer.restore(tmp_path / "small", {"x": jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                                                   sharding=value.sharding)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(value))

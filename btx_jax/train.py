"""``python -m btx_jax.train --config configs/demo_dense.py --workdir runs/seed``

Trains a model on the configured domain mixture: jitted sharded steps, periodic logging,
per-domain held-out evaluation and Orbax checkpoints (with the data iterator), resuming
automatically from the latest checkpoint in the workdir. SIGTERM/SIGINT save and exit.
"""
from __future__ import annotations

import signal
import sys
import time

if __name__ == "__main__":  # before jax is imported: see btx_jax/host_memory.py
    from btx_jax import host_memory

    host_memory.reexec_with_huge_pages(keep_freed=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from btx_jax import checkpoint, compilation_cache, config as config_lib, distributed, sharding, steps  # noqa: E402
from btx_jax.evaluate import evaluate, load_eval_sets  # noqa: E402
from btx_jax.data import pipeline  # noqa: E402
from btx_jax.data.tokenizer import make_tokenizer  # noqa: E402
from btx_jax.flops import job_peak_flops, matmul_params, train_flops_per_token  # noqa: E402
from btx_jax.metrics import MetricsWriter  # noqa: E402
from btx_jax.data.datasets import DataError  # noqa: E402
from btx_jax.state import TrainSetup, checkpoint_state_keys, init_params, make_setup, param_count, schedule  # noqa: E402

# Errors caused by the user's input: printed as one clear message, exit status 2.
USER_ERRORS = (config_lib.ConfigError, DataError, checkpoint.CheckpointError)


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit).

    In a multi-process job every process must stop after the *same* step (the checkpoint is written
    collectively), so there JAX's preemption notifier takes SIGTERM (a TPU or GKE preemption, `scancel`,
    or `kill` of any one process) and `reached_preemption_sync_point` agrees on the step."""

    def __init__(self):
        self.signum = None
        self._multi_process = jax.process_count() > 1
        signals = () if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def check(self, step: int) -> bool:
        """True once a stop was requested (in a multi-process job: at the step all processes agreed on)."""
        if self._multi_process and self.signum is None and multihost_utils.reached_preemption_sync_point(step):
            self.signum = signal.SIGTERM
            print(f"\n[train] preemption notice: every process saves a checkpoint at step {step}", flush=True)
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[train] received {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _check_tokenizer(config) -> None:
    vocab = make_tokenizer(config.data).vocab_size
    if config.model.vocab_size < vocab:
        raise config_lib.ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than the "
                                     f"tokenizer's vocabulary ({vocab})", f"use at least {vocab}")


def initial_state(config, setup: TrainSetup, manager, data_iterator) -> tuple[dict, int]:
    """Latest checkpoint of this workdir if any, else params from init_from, else random."""
    latest = manager.latest_step()
    if latest is not None:
        checkpoint.check_compatible(checkpoint.step_dir(str(manager.directory)), setup.abstract_params)
        _check_router_bias(checkpoint.step_dir(str(manager.directory)), setup)
        print(f"[train] resuming from step {latest} in {manager.directory}", flush=True)
        try:
            return checkpoint.restore(manager, latest, setup.abstract_state(), data_iterator), latest
        except ValueError as e:
            if "opt_state" not in str(e):
                raise
            raise checkpoint.CheckpointError(
                f"the optimizer state saved at step {latest} in {manager.directory} does not fit this config: the "
                "optimizer changed since (train.trainable, or optim.* fields that shape the state)\n  fix: resume "
                "with the config the run was started with, or start a new workdir with --config.train.init_from "
                "pointing to this checkpoint (params only, fresh optimizer)") from e
    if config.train.init_from:
        print(f"[train] initialising params from {checkpoint.step_dir(config.train.init_from)} "
              "(fresh optimizer, step 0)", flush=True)
        return setup.init_state(checkpoint.load_params(config.train.init_from, setup.abstract_params)), 0
    return setup.init_state(init_params(config, setup, config.train.seed)), 0


def _check_router_bias(path: str, setup: TrainSetup) -> None:
    """A run resumes with the balancing it was started with: the state's ``router_bias`` exists only with
    moe.balance=bias (to change the balancing, start a new workdir with train.init_from)."""
    saved = "router_bias" in checkpoint_state_keys(path)
    if saved != (setup.router_bias_shape is not None):
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained {'with' if saved else 'without'} moe.balance=bias, this config "
            f"{'does not use' if saved else 'uses'} it\n  fix: resume with the same moe.balance, or start a new "
            "workdir with --config.train.init_from pointing to this checkpoint")


class Throughput:
    """Steps/s, tokens/s, MFU and ETA over the steps since the last report."""

    def __init__(self, config, total_steps: int, start_step: int):
        self.tokens_per_step = config.data.batch_size * config.data.seq_len
        self.flops_per_step = train_flops_per_token(config.model, config.data.seq_len, config.moe) * self.tokens_per_step
        self.peak = job_peak_flops(config.train.peak_flops)
        self.total, self.last_step, self.last_time = total_steps, start_step, time.perf_counter()

    def restart(self, step: int) -> None:
        """Excludes time spent outside train steps (eval, checkpointing) from the next report."""
        self.last_step, self.last_time = step, time.perf_counter()

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"perf/steps_per_s": steps_per_s, "perf/tokens_per_s": steps_per_s * self.tokens_per_step,
                "perf/mfu": steps_per_s * self.flops_per_step / self.peak,
                "perf/eta_s": (self.total - step) / max(steps_per_s, 1e-9)}


def _print_plan(config, mesh, setup, workdir) -> None:
    n = param_count(setup.abstract_params)
    moe = config.moe
    kind = (f", MoE {moe.num_experts} experts top-{moe.top_k} ({moe.dispatcher}), "
            f"{matmul_params(config.model, moe) / 1e6:.2f}M active matmul params") if moe.num_experts else ""
    print(f"[train] workdir {workdir}\n[train] mesh {sharding.describe(mesh)}\n"
          f"[train] model: {n / 1e6:.2f}M params, {config.model.num_layers} layers, d_model {config.model.d_model}{kind}\n"
          f"[train] data: domains {', '.join(f'{k} {w:.2f}' for k, w in config_lib.domain_weights(config.data).items())}, {config.data.batch_size} x "
          f"{config.data.seq_len} tokens/step, {config.train.steps} steps", flush=True)


def _due(step: int, every: int, total: int) -> bool:
    return step % every == 0 or step == total


def _log_train(writer, throughput, pending: list, step: int, config, lr_at) -> None:
    """Means of the step metrics since the last log, plus throughput and lr, to all sinks."""
    means = {k: np.mean([np.asarray(m[k]) for m in pending], axis=0) for k in pending[0]}
    logged = {k: float(v) for k, v in means.items() if not k.startswith("moe/")}
    logged.update(throughput.report(step), lr=float(lr_at(step - 1)))
    writer.scalars(step, logged)
    router = {k.removeprefix("moe/"): v for k, v in means.items() if k.startswith("moe/")}
    moe_line = ""
    if router:
        writer.router_stats(step, router)
        moe_line = (f" | balance {router['load_balance_loss'].mean():.3f} "
                    f"max/mean load {router['load_imbalance'].max():.2f} "
                    f"dropped {router['dropped_fraction'].mean():.1%}")
    print(f"[train] step {step}/{config.train.steps} loss {logged['loss']:.4f}{moe_line} | "
          f"{logged['perf/tokens_per_s']:,.0f} tok/s | mfu {logged['perf/mfu']:.2f} | "
          f"eta {_format_eta(logged['perf/eta_s'])}", flush=True)


def _log_eval(writer, step: int, metrics: dict) -> None:
    writer.scalars(step, metrics)
    print(f"[eval] step {step} | " + " | ".join(
        f"{k.split('/')[1]} ppl {v:.3f}" for k, v in metrics.items() if k.endswith("/ppl")), flush=True)


def process_rows(config, batch_sharding) -> list[int]:
    """The rows of the global batch that this process's devices hold, in order."""
    rows = config.data.batch_size
    index_map = batch_sharding.addressable_devices_indices_map((rows, config.data.seq_len))
    return sorted({r for index in index_map.values() for r in range(*index[0].indices(rows))})


def process_shards(config, batch_sharding) -> list[int]:
    """The data shards (pipeline.train_iterator) whose rows of the global batch this process's devices hold,
    in row order, so that the global batch is the same however many processes share it."""
    rows, total = config.data.batch_size, pipeline.num_shards(config.data)
    if total % jax.process_count() or rows % total:
        raise config_lib.ConfigError("data.shards", f"{total} shards do not split over {jax.process_count()} processes "
                                     f"and data.batch_size={rows} rows", "use a multiple of the process count that "
                                     "divides batch_size (or 0: one per process)")
    per_shard = rows // total
    held = process_rows(config, batch_sharding)
    shards = sorted({r // per_shard for r in held})
    if len(held) != len(shards) * per_shard:
        raise config_lib.ConfigError("data.shards", f"this process holds {len(held)} rows of the batch, not whole "
                                     f"shards of {per_shard} rows", "use data.shards=0 (one per process)")
    return shards


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is saved when a stop signal arrived; carries the signal number."""


def run(config, workdir: str) -> dict:
    """Trains to config.train.steps; returns the last eval metrics. A stop signal saves, then raises."""
    config_lib.validate(config)
    _check_tokenizer(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisible(config, mesh)
    setup = make_setup(config, mesh)
    _print_plan(config, mesh, setup, workdir)
    shardings = steps.batch_shardings(mesh)
    data_iterator = pipeline.train_iterator(config.data, pipeline.open_sources(config.data, "train"),
                                            process_shards(config, shardings["inputs"]))
    eval_sets = load_eval_sets(config, rows=process_rows(config, shardings["inputs"]) if jax.process_count() > 1 else None)
    manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
    state, step = initial_state(config, setup, manager, data_iterator)
    writer = MetricsWriter(workdir, resume_step=step, enabled=distributed.is_main())
    writer.text("config", "<pre>" + config.to_json_best_effort(indent=2) + "</pre>")
    train_step = steps.make_train_step(setup, shardings, config)
    eval_step = steps.make_eval_step(setup, shardings)
    lr_at, total = schedule(setup.schedule_numbers), config.train.steps
    stop, throughput, pending, eval_metrics = StopRequested(), Throughput(config, total, step), [], {}
    try:
        while step < total and stop.signum is None:
            state, metrics = train_step(state, steps.to_global(next(data_iterator), shardings))
            step += 1
            pending.append(metrics)
            if _due(step, config.train.log_every, total) or step == 1:
                _log_train(writer, throughput, pending, step, config, lr_at)
                pending = []
            if _due(step, config.train.eval_every, total):
                eval_metrics = evaluate(steps.with_router_bias(eval_step, state.get("router_bias")),
                                        state["params"], eval_sets, shardings)
                _log_eval(writer, step, eval_metrics)
                throughput.restart(step)
            stopping = stop.check(step)  # every step: a multi-process job's processes must agree on the step
            if _due(step, config.train.checkpoint_every, total) or stopping:
                checkpoint.save(manager, step, state, data_iterator, config)
                writer.flush()  # on a URL the metrics file is uploaded whole: keep the lines a resume will not redo
        manager.wait_until_finished()
    finally:
        stop.restore()
        writer.close()
    if stop.signum is not None:
        print(f"[train] stopped at step {step}; checkpoint saved. Run the same command again to resume.", flush=True)
        raise TrainingInterrupted(stop.signum)
    print(f"[train] done: {step} steps; checkpoints in {manager.directory}", flush=True)
    return eval_metrics


def _define_flags():
    """Command-line flags, defined only when run as a program (so the module stays importable)."""
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo_dense.py[:variant].",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
    distributed.define_flags()


def main(argv):
    del argv
    compilation_cache.enable()
    logging.set_verbosity(logging.WARNING)  # library INFO logs drown the progress lines
    distributed.initialize("[train]")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required: the directory for checkpoints and logs")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except TrainingInterrupted as e:
        sys.exit(128 + e.args[0])
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""Bad input fails early with a clear message (field, problem, fix) before any training step,
and leaves nothing that looks like a finished checkpoint behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest
from ml_collections import ConfigDict

from btx_jax import checkpoint, sharding, train
from btx_jax.checkpoint import CheckpointError
from btx_jax.config import ConfigError, base_config, load_config, validate
from btx_jax.data import pipeline
from btx_jax.data.datasets import DataError
from helpers import subprocess_env, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "btx_jax.train", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def step_dirs(workdir) -> list[str]:
    """Entries of workdir/checkpoints that are (or start like) step directories."""
    path = os.path.join(str(workdir), "checkpoints")
    return sorted(d for d in os.listdir(path) if d[:1].isdigit()) if os.path.isdir(path) else []


def mesh_config(**axes) -> ConfigDict:
    m = ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    m.update(**axes)
    return m


def write_jsonl(path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + "lorem ipsum " * (i % 5 + 1)}) + "\n")


def run_config(data_dir, src, **model) -> ConfigDict:
    """A seconds-long run: tiny model, one small files: domain, 2 steps, a checkpoint each step."""
    c = tiny_config(**model)
    c.data.data_dir = str(data_dir)
    c.data.domains = ConfigDict({"text": f"files:{src}"})
    c.optim.warmup_steps = 1
    c.train.update(steps=2, checkpoint_every=1, eval_every=2, eval_batches=1, log_every=1, peak_flops=1e11)
    return c


def run_quietly(config, workdir):
    """train.run, restoring the process's SIGINT/SIGTERM handlers afterwards (run installs its own)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train.run(config, str(workdir))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the tiny model (d_model 64): (data_dir, source file, workdir)."""
    root = tmp_path_factory.mktemp("trained")
    src = root / "docs.jsonl"
    write_jsonl(src, 300)  # ~15 eval documents: the eval split is never empty
    workdir = root / "run"
    metrics = run_quietly(run_config(root / "tfds", src), workdir)
    assert metrics["eval/text/loss"] > 0
    assert step_dirs(workdir) == ["1", "2"]
    return root / "tfds", src, workdir


# ------------------------------------------------------------------------- config fields


def test_typo_in_config_file_names_field_and_fix(tmp_path):
    """A config file that sets model.d_modle fails validate() naming the field and suggesting d_model."""
    path = tmp_path / "typo.py"
    path.write_text("from btx_jax.config import base_config\n\n"
                    "def get_config(variant=None):\n"
                    "    c = base_config()\n"
                    "    c.model.d_modle = 96\n"
                    "    return c\n")
    config = load_config(str(path))
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert info.value.field == "model.d_modle"
    assert "config.model.d_modle: unknown field" in str(info.value)
    assert "did you mean 'd_model'?" in str(info.value)


def test_typo_in_config_file_via_cli(tmp_path):
    """The same typo through `python -m btx_jax.train`: one `error:` line, exit 2, no workdir."""
    path = tmp_path / "typo.py"
    path.write_text("from btx_jax.config import base_config\n\n"
                    "def get_config(variant=None):\n"
                    "    c = base_config()\n"
                    "    c.train.stpes = 5\n"
                    "    return c\n")
    workdir = tmp_path / "run"
    result = cli(f"--config={path}", f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: config.train.stpes: unknown field" in result.stderr
    assert "did you mean 'steps'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_typo_in_cli_override_fails(tmp_path):
    """--config.model.d_modle=3 is rejected by ml_collections (non-zero exit, names the key)."""
    workdir = tmp_path / "run"
    result = cli("--config=configs/demo_dense.py:tiny", f"--workdir={workdir}", "--config.model.d_modle=3")
    assert result.returncode != 0
    assert "d_modle" in result.stderr
    assert "[train] step" not in result.stdout
    assert not workdir.exists()


def test_unknown_domain_source_kind():
    """A domain spec 'web:foo' is not a source kind: ConfigError naming the domain and the valid kinds."""
    c = base_config()
    c.data.domains = ConfigDict({"code": "demo:code", "crawl": "web:foo"})
    with pytest.raises(ConfigError) as info:
        validate(c)
    assert info.value.field == "data.domains.crawl"
    assert "'web:foo'" in str(info.value) and "files:<glob>" in str(info.value)


def test_missing_init_from_path(tmp_path):
    """train.init_from pointing nowhere: ConfigError naming train.init_from and the path."""
    c = tiny_config()
    c.train.init_from = str(tmp_path / "no_such_run")
    with pytest.raises(ConfigError) as info:
        validate(c)
    assert info.value.field == "train.init_from"
    assert "checkpoint not found" in str(info.value) and "no_such_run" in str(info.value)


def test_vocab_smaller_than_tokenizer(tmp_path):
    """model.vocab_size=100 with the byte tokenizer (259 ids): ConfigError before anything is written."""
    c = tiny_config(vocab_size=100)
    c.data.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        run_quietly(c, workdir)
    assert info.value.field == "model.vocab_size"
    assert "100 is smaller than the tokenizer's vocabulary (259)" in str(info.value)
    assert "use at least 259" in str(info.value)
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


# ---------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("axes, uses", [(dict(data=3), 3), (dict(data=2, fsdp=2), 4)])
def test_mesh_not_matching_device_count(axes, uses):
    """Explicit mesh sizes whose product is not the 8 devices: ConfigError naming mesh."""
    assert jax.device_count() == 8
    with pytest.raises(ConfigError) as info:
        sharding.make_mesh(mesh_config(**axes))
    assert info.value.field == "mesh"
    assert str(info.value).startswith("config.mesh:")
    assert f"uses {uses} devices but 8 are available" in str(info.value)


def test_mesh_free_axis_that_cannot_fit():
    """data=3 with fsdp=-1: 3 does not divide 8 devices -> ConfigError on the mesh."""
    with pytest.raises(ConfigError) as info:
        sharding.make_mesh(mesh_config(data=3, fsdp=-1))
    assert info.value.field == "mesh.fsdp"
    assert "does not divide the 8 available" in str(info.value)


def test_mesh_two_free_axes():
    """Two -1 axes are ambiguous: ConfigError saying only one may be -1."""
    with pytest.raises(ConfigError) as info:
        sharding.make_mesh(mesh_config(data=-1, fsdp=-1))
    assert info.value.field.startswith("mesh.")
    assert "only one mesh axis may be -1" in str(info.value)


def test_bad_mesh_stops_run_before_anything_is_written(tmp_path):
    """run() with mesh data=3 on 8 devices raises before building data or creating the workdir."""
    c = tiny_config()
    c.mesh.data = 3
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(ConfigError) as info:
        run_quietly(c, tmp_path / "run")
    assert info.value.field == "mesh"
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


def test_batch_not_divisible_over_batch_axes():
    """batch_size 12 over data=2 x fsdp=2 x expert=2 = 8 ways: ConfigError naming data.batch_size."""
    c = tiny_config()
    c.data.batch_size = 12
    mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, expert=2))
    with pytest.raises(ConfigError) as info:
        sharding.check_divisible(c, mesh)
    assert info.value.field == "data.batch_size"
    assert "12 rows do not split over data x fsdp x expert = 8 devices" in str(info.value)
    assert "use a multiple of 8" in str(info.value)
    c.data.batch_size = 16
    sharding.check_divisible(c, mesh)  # a multiple is fine


def test_heads_not_divisible_over_tensor_axis():
    """num_heads 6 over tensor=4: ConfigError naming model.num_heads."""
    c = tiny_config(num_heads=6, num_kv_heads=2)
    mesh = sharding.make_mesh(mesh_config(data=2, tensor=4))
    with pytest.raises(ConfigError) as info:
        sharding.check_divisible(c, mesh)
    assert info.value.field == "model.num_heads"
    assert "6 does not split over the 'tensor' mesh axis of size 4" in str(info.value)


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("kind", ["files", "demo"])
def test_missing_dataset_without_build(tmp_path, kind):
    """build_if_missing=False and an empty data_dir: DataError saying not found and how to build."""
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, 50)
    c = base_config()
    c.data.data_dir = str(tmp_path / "empty")
    c.data.build_if_missing = False
    c.data.domains = ConfigDict({"mine": f"files:{src}" if kind == "files" else "demo:math"})
    validate(c)
    with pytest.raises(DataError) as info:
        pipeline.open_sources(c.data, "train")
    message = str(info.value)
    assert "domain 'mine'" in message and "not found in data_dir" in message and str(tmp_path / "empty") in message
    assert "data.build_if_missing=True" in message and "python -m btx_jax.data.build" in message
    built = [f for _, _, files in os.walk(tmp_path / "empty") for f in files if f == "dataset_info.json"]
    assert built == []  # nothing was built behind the user's back


def test_missing_dataset_via_cli(tmp_path):
    """The CLI prints `error: ...` (no traceback), exits 2 and writes no checkpoint."""
    workdir = tmp_path / "run"
    result = cli("--config=configs/demo_dense.py:tiny", f"--workdir={workdir}",
                 f"--config.data.data_dir={tmp_path / 'empty'}", "--config.data.build_if_missing=False")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "not found in data_dir" in errors[0] and "python -m btx_jax.data.build" in errors[0]
    assert "Traceback" not in result.stderr
    assert "[train] step" not in result.stdout
    assert step_dirs(workdir) == []


def test_files_glob_matching_nothing(tmp_path):
    """A files: glob that matches no file: DataError naming the domain and its config field."""
    c = base_config()
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.domains = ConfigDict({"notes": f"files:{tmp_path / 'nowhere' / '*.txt'}"})
    validate(c)
    with pytest.raises(DataError) as info:
        pipeline.open_sources(c.data, "train")
    assert "domain 'notes': no files match" in str(info.value)
    assert "data.domains.notes" in str(info.value)


def test_domain_with_only_blank_lines(tmp_path):
    """A .jsonl file of blank lines: DataError saying the domain has no documents (not a TFDS crash)."""
    src = tmp_path / "blank.jsonl"
    src.write_text("\n\n   \n\n")
    c = base_config()
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.domains = ConfigDict({"empty": f"files:{src}"})
    validate(c)
    with pytest.raises(DataError) as info:
        pipeline.open_sources(c.data, "train")
    assert "domain 'empty'" in str(info.value)
    assert "no documents" in str(info.value)


def test_domain_too_small_for_both_splits(tmp_path):
    """A files: domain of one document has an empty train or eval split: DataError naming the
    domain and saying it has no documents there (not a TFDS AssertionError, which the CLI would
    show as a traceback)."""
    src = tmp_path / "one.txt"
    src.write_text("a single document")
    c = base_config()
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.domains = ConfigDict({"tiny": f"files:{src}"})
    validate(c)
    with pytest.raises(DataError) as info:
        pipeline.open_sources(c.data, "train")
        pipeline.open_sources(c.data, "eval")
    assert "domain 'tiny'" in str(info.value)
    assert "no documents" in str(info.value)


# ---------------------------------------------------------------------- checkpoints


def test_init_from_checkpoint_of_another_shape(tmp_path, trained):
    """init_from a d_model=64 run into a d_model=32 model: CheckpointError listing each mismatched
    param with both shapes, raised before the new run writes any checkpoint."""
    data_dir, src, source_run = trained
    c = run_config(data_dir, src, d_model=32)
    c.train.init_from = str(source_run)
    workdir = tmp_path / "new_run"
    with pytest.raises(CheckpointError) as info:
        run_quietly(c, workdir)
    message = str(info.value)
    assert "does not fit this model" in message
    assert "layers/mlp/gate/kernel: checkpoint shape (2, 64, 128), model shape (2, 32, 128)" in message
    assert "embed/embedding: checkpoint shape (384, 64), model shape (384, 32)" in message
    assert "use the model config the checkpoint was trained with" in message
    assert step_dirs(workdir) == []
    assert step_dirs(source_run) == ["1", "2"]


def test_resume_with_changed_model_shape(trained, tmp_path):
    """Re-running a workdir with another model shape: CheckpointError, the old checkpoints untouched."""
    data_dir, src, source_run = trained
    workdir = tmp_path / "copy"
    shutil.copytree(source_run, workdir)
    c = run_config(data_dir, src, mlp_dim=96)
    with pytest.raises(CheckpointError) as info:
        run_quietly(c, workdir)
    message = str(info.value)
    assert "layers/mlp/gate/kernel: checkpoint shape (2, 64, 128), model shape (2, 64, 96)" in message
    assert step_dirs(workdir) == ["1", "2"]


def test_interrupted_save_is_not_a_step(trained, tmp_path, capsys):
    """An Orbax temporary dir (interrupted save of step 7) is ignored: step_dir picks step 2 and
    run() resumes from step 2, never from 7."""
    data_dir, src, source_run = trained
    workdir = tmp_path / "copy"
    shutil.copytree(source_run, workdir)
    partial = workdir / "checkpoints" / "7.orbax-checkpoint-tmp-123"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "partial.bin").write_bytes(b"\0" * 100)
    assert checkpoint.step_dir(str(workdir)) == str(workdir / "checkpoints" / "2")
    c = run_config(data_dir, src)
    c.train.steps = 3
    capsys.readouterr()
    run_quietly(c, workdir)
    out = capsys.readouterr().out
    assert "resuming from step 2" in out
    assert "step 3/3" in out and "done: 3 steps" in out
    assert "step 7" not in out and "resuming from step 7" not in out
    assert checkpoint.step_dir(str(workdir)) == str(workdir / "checkpoints" / "3")


def test_only_partial_checkpoints_means_no_checkpoint(tmp_path):
    """A checkpoints/ dir with only a temporary dir holds no complete step: step_dir says so
    and the manager reports no latest step (a run starts fresh)."""
    partial = tmp_path / "run" / "checkpoints" / "1.orbax-checkpoint-tmp-9"
    (partial / "state").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        checkpoint.step_dir(str(tmp_path / "run"))
    assert "no complete checkpoint" in str(info.value)
    manager = checkpoint.make_manager(str(tmp_path / "run"), keep=3, async_save=False)
    assert manager.latest_step() is None
    assert manager.all_steps() == []
    manager.close()

"""Orbax checkpoints of a run: train state, grain iterator state and the config, per step.

Layout: ``workdir/checkpoints/<step>/{state,data,config}``. Orbax writes each step into a
temporary directory and renames it when complete (on GCS, where a rename is a copy, it writes
``commit_success.txt`` last instead), so an interrupted save never leaves a directory that looks
like a finished checkpoint. Paths may be URLs (``gs://...``): they go through :mod:`btx_jax.paths`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from btx_jax import distributed, paths


def _register_array_handler() -> None:
    """Orbax's replica-parallel save writes a replicated array as one slice per replica, and compiles a slice
    program per device and shape to cut it: for the small arrays of small models that is all cost (the tests'
    tiny recipe compiled 96 of them). Arrays whose slice per replica would be under 1 MiB are written whole
    by their first replica; larger ones (real models on many replicas) keep replica-parallel writes. A tiny
    train run in a fresh process: 9.5 -> 7.2 s."""
    try:  # the metadata store of orbax's own default handler; a private module, which a newer orbax may move
        from orbax.checkpoint._src.metadata import array_metadata_store
    except ImportError:
        return  # orbax's default handler stays: slower for small arrays, the same checkpoints

    from absl import logging as absl_logging

    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=1 << 20)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that the default handler is replaced
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


_register_array_handler()


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit the model; the message says how to fix it."""


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        paths.resolve(workdir) / "checkpoints", options=options,
        item_names=("state", "data", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})


def save(manager, step: int, state: dict, data_iterator, config) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())), force=True)


def restore(manager, step: int, abstract_state: dict, data_iterator) -> dict:
    """Restores onto the shardings carried by `abstract_state` (any mesh) and rewinds the iterator."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]


def step_dir(path) -> str:
    """A run's checkpoints/ dir (-> its latest complete step), a workdir, or one step's dir."""
    path = paths.resolve(path)
    if (path / "state").is_dir():
        return str(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted(int(d.name) for d in path.iterdir() if d.name.isdigit() and _complete(d)) if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {path}; give a workdir, its checkpoints/ "
                              "directory or a step directory of a finished save")
    return str(path / str(steps[-1]))


def _complete(step: epath.Path) -> bool:
    """A finished save: Orbax's own test (locally the name, renamed into place when done; on GCS its
    commit_success.txt), or the manifest.json a params-only checkpoint writes last."""
    return ocp.path.step.is_path_finalized(step) or (step / "manifest.json").exists()


def param_metadata(path: str) -> dict:
    """{leaf path: (shape, dtype)} of a checkpoint's params, read without loading any array."""
    meta = ocp.PyTreeCheckpointer().metadata(epath.Path(step_dir(path)) / "state").item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(meta["params"], is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): (tuple(v.shape), str(v.dtype)) for k, v in flat}


def check_compatible(path: str, abstract_params: dict) -> None:
    """Raises CheckpointError listing every param whose presence or shape differs."""
    have = param_metadata(path)
    want = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    problems = [f"  {k}: missing from the checkpoint" for k in want if k not in have]
    problems += [f"  {k}: checkpoint has no such param in this model" for k in have if k not in want]
    problems += [f"  {k}: checkpoint shape {have[k][0]}, model shape {want[k]}"
                 for k in want if k in have and have[k][0] != want[k]]
    if problems:
        raise CheckpointError(f"checkpoint {step_dir(path)} does not fit this model:\n" + "\n".join(problems[:20])
                              + "\n  fix: use the model config the checkpoint was trained with")


def load_params(path: str, abstract_params: dict) -> dict:
    """Only the params of a checkpoint, placed with `abstract_params`' shardings (a new mesh is fine)."""
    check_compatible(path, abstract_params)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract_params)
    restored = ocp.PyTreeCheckpointer().restore(
        epath.Path(step_dir(path)) / "state",
        args=ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                    partial_restore=True))
    return restored["params"]


def read_param(path: str, name: str, shape, dtype) -> np.ndarray:
    """One param (``name`` like ``layers/mlp/gate/kernel``) of a checkpoint as a host numpy array.

    A partial restore: nothing else is read, so memory is this one array."""
    item = nested({}, f"params/{name}", jax.ShapeDtypeStruct(tuple(shape), dtype))
    restore_args = nested({}, f"params/{name}", ocp.RestoreArgs(restore_type=np.ndarray))
    restored = ocp.PyTreeCheckpointer().restore(
        epath.Path(step_dir(path)) / "state",
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    for k in ["params", *name.split("/")]:
        restored = restored[k]
    return np.asarray(restored)


_TS_CONTEXT = {}


def open_param(path: str, name: str, dtype: str | None = None, write: bool = False):
    """One param of a checkpoint as an open tensorstore array, read as `dtype` (default: as stored):
    index it and ``.read()`` to get one slice; only the chunks the slice covers are read. With
    `write`, slices can also be overwritten in place.

    The spec is the one Orbax restores with (OCDBT or not, zarr v2 or v3, as the checkpoint says)."""
    import tensorstore as ts

    state = epath.Path(step_dir(path)) / "state"
    use_zarr3 = bool(json.loads((state / "_METADATA").read_text()).get("use_zarr3", False))
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state)
    context = _TS_CONTEXT.setdefault(use_ocdbt, ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt))
    info = ocp.type_handlers.ParamInfo(name="params." + name.replace("/", "."), parent_dir=state, ts_context=context,
                                       is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    if dtype is not None:
        spec = {"driver": "cast", "base": spec, "dtype": str(np.dtype(dtype))}
    return ts.open(spec, open=True, read=True, write=write, context=context).result()


def nested(tree: dict, path: str, value) -> dict:
    """Puts `value` at ``a/b/c`` in a nested dict (creating the levels); returns the tree."""
    node = tree
    *parents, leaf = path.split("/")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value
    return tree


def saved_model_config(path: str) -> dict:
    """{"model": {...}, "moe": {...}, "tokenizer": data.tokenizer or None, "hf": what a Hugging Face import
    recorded of its source or {}} of a checkpoint: from the run's saved config (btx_jax.train) or the
    ``manifest.json`` that btx_jax.mix and the Hugging Face import write next to ``state``."""
    directory = epath.Path(step_dir(path))
    manifest = directory / "manifest.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
    else:
        try:
            saved = json.loads((directory / "config" / "metadata").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory} has neither a manifest.json nor a saved run config ({e})") from e
    if "model" not in saved:
        raise CheckpointError(f"{directory}: the saved config has no model section")
    tokenizer = (saved.get("data") or {}).get("tokenizer", saved.get("tokenizer"))
    return {"model": saved["model"], "moe": saved.get("moe") or {"num_experts": 0}, "tokenizer": tokenizer,
            "hf": saved.get("hf") or {}}


class ParamWriter:
    """Writes a params-only checkpoint (``<output>/state``, loadable by :func:`load_params`) one leaf
    at a time with Orbax's partial save (:meth:`write`), so memory is one leaf, not the model; or in
    one Orbax save whose leaves may be written slice by slice by a custom type handler (:meth:`write_all`).

    The checkpoint is built under ``.<name>.incomplete`` next to `output` and renamed into place by
    :meth:`finish`, with its ``manifest.json``: an interrupted write never leaves a directory that
    looks finished, and the next run removes the leftover. `output` may be a URL (``gs://...``).
    In a multi-process job every process enters, writes and finishes; process 0 alone creates,
    renames and removes directories. Use as a context manager.
    """

    def __init__(self, output, tag: str = "[checkpoint]", out=print):
        self.output, self.tag, self.out = paths.resolve(output), tag, out
        self.scratch = self.output.parent / f".{self.output.name}.incomplete"
        self.tmp = self.scratch / "checkpoint"  # orbax's partial-save session lives next to it
        self._whole = False
        self._local: epath.Path | None = None  # a URL output's leaf-by-leaf saves, staged on this host

    def __enter__(self) -> "ParamWriter":
        from orbax.checkpoint import v1 as ocp_v1

        if self.output.exists() and paths.is_url(self.output) and not (self.output / "manifest.json").exists():
            if distributed.is_main():  # a copy up (see finish) that was interrupted: manifest.json comes last
                self.out(f"{self.tag} removing {self.output}, an interrupted copy (it has no manifest.json)")
                self.output.rmtree()
            distributed.barrier("ParamWriter:leftover")
        if self.output.exists():
            raise CheckpointError(f"output {self.output} already exists\n  fix: remove it or choose another output")
        if distributed.is_main():
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if self.scratch.exists():
                self.out(f"{self.tag} removing {self.scratch} left by an interrupted run")
                self.scratch.rmtree()
            self.scratch.mkdir()
        distributed.barrier("ParamWriter:enter")
        # Uncompressed: weights barely compress, and zstd would cost time and a transient copy per leaf.
        self._context = ocp_v1.Context()
        self._context.array.saving.use_compression = False
        self._context.__enter__()
        return self

    def _partial_dir(self) -> epath.Path:
        """Where :meth:`write` saves: Orbax's partial save does not work on GCS (its temporary paths are
        not supported there), so for a URL output the leaves go to a local directory first and
        :meth:`finish` copies the finished checkpoint up (local disk: the model's size)."""
        if not paths.is_url(self.output):
            return self.tmp
        if self._local is None:
            self._local = epath.Path(tempfile.mkdtemp(prefix="btx_params_")) / "checkpoint"  # local: staging
        return self._local

    def write(self, name: str, value) -> None:
        """Saves one param (``name`` like ``layers/mlp/gate/kernel``); a host or jax array."""
        from orbax.checkpoint.experimental.v1 import partial as partial_save

        partial_save.save(self._partial_dir(), nested({}, f"params/{name}", value))

    def write_all(self, params: dict, type_handler_registry=None) -> None:
        """Saves the whole params tree in one Orbax save (instead of :meth:`write`). Leaves of types
        that `type_handler_registry` handles are written by it (e.g. slice by slice); the result
        restores with Orbax's standard handlers. Every process of a job calls it with the same tree."""
        if distributed.is_main():
            self.tmp.mkdir()
        registry = {} if type_handler_registry is None else {"type_handler_registry": type_handler_registry}
        handler = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False, **registry)
        ocp.Checkpointer(handler).save(self.tmp / "state", args=ocp.args.PyTreeSave({"params": params}))
        self._whole = True

    def finish(self, manifest: dict) -> None:
        from orbax.checkpoint.experimental.v1 import partial as partial_save

        if not self._whole:
            partial_save.finalize(self._partial_dir())
        if self._local is not None:
            # Copied straight to the output (a rename on GCS would copy every object once more), marked
            # complete the way Orbax marks a save on GCS, with manifest.json last: until it exists the
            # output is an interrupted copy, which the next writer removes.
            if distributed.is_main():
                _copy_tree(self._local, self.output)
                (self.output / "state" / "commit_success.txt").write_text(f"Checkpoint commit was successful to "
                                                                          f"{self.output}")
                (self.output / "manifest.json").write_text(json.dumps(manifest, indent=1))
            distributed.barrier("ParamWriter:finish")
            return
        if distributed.is_main():
            (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            self.tmp.rename(self.output)
        distributed.barrier("ParamWriter:finish")

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        if distributed.is_main():
            self.scratch.rmtree(missing_ok=True)
        if self._local is not None:
            self._local.parent.rmtree(missing_ok=True)


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    """Every file under the local directory `source` to the same place under `target` (a URL), streamed."""
    for directory, _, files in sorted(os.walk(source)):  # local: the staging directory
        for name in sorted(files):
            local = epath.Path(directory) / name
            dest = target / local.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with local.open("rb") as reader, dest.open("wb") as writer:
                shutil.copyfileobj(reader, writer, 16 << 20)

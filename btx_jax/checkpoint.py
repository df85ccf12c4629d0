"""Orbax checkpoints of a run: train state, grain iterator state and the config, per step.

Layout: ``workdir/checkpoints/<step>/{state,data,config}``. Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save never leaves a
directory that looks like a finished checkpoint.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit the model; the message says how to fix it."""


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
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


def step_dir(path: str) -> str:
    """A run's checkpoints/ dir (-> its latest step), a workdir, or one step's dir."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {path}; give a workdir, its checkpoints/ "
                              "directory or a step directory of a finished save")
    return os.path.join(path, str(steps[-1]))


def param_metadata(path: str) -> dict:
    """{leaf path: (shape, dtype)} of a checkpoint's params, read without loading any array."""
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir(path), "state")).item_metadata.tree
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
        os.path.join(step_dir(path), "state"),
        args=ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                    partial_restore=True))
    return restored["params"]

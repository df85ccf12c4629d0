"""Safetensors model directories: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.

Reading goes one tensor at a time through the ``safetensors`` package (numpy, memory-mapped), so a
conversion holds one tensor plus whatever it is building, never the whole model. Writing follows
``save_pretrained``: shards of at most ``max_shard_bytes``, named ``model-0000k-of-0000n.safetensors``,
with an index mapping every tensor to its shard (a single ``model.safetensors`` when it all fits).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from btx_jax.hf.hf_config import HFError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def is_hf_dir(path: str) -> bool:
    path = os.path.expanduser(str(path))
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX)) or os.path.isfile(os.path.join(path, SINGLE))
        or os.path.isfile(os.path.join(path, "pytorch_model.bin")))


class SafetensorsDir:
    """The tensors of a Hugging Face directory: names, shapes and dtypes up front, data on demand."""

    def __init__(self, path: str):
        self.path = os.path.expanduser(path)
        if os.path.isfile(os.path.join(self.path, INDEX)):
            with open(os.path.join(self.path, INDEX), encoding="utf-8") as f:
                files = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            files = None
        else:
            raise HFError(f"{path} has no {SINGLE} or {INDEX} (a pytorch_model.bin is not read: it is a pickle)\n"
                          "  fix: convert it to safetensors first, e.g. with transformers' save_pretrained")
        self.file_of, self.meta = {}, {}
        for name in sorted(set(files.values())) if files else [SINGLE]:
            full = os.path.join(self.path, name)
            if not os.path.isfile(full):
                raise HFError(f"{path}: shard {name} listed in {INDEX} is missing\n  fix: download it again")
            with safe_open(full, "np") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in _DTYPES:
                        raise HFError(f"{path}: tensor {key} has dtype {dtype}; only {sorted(_DTYPES)} are supported")
                    self.file_of[key] = full
                    self.meta[key] = (tuple(piece.get_shape()), _DTYPES[dtype])

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def get(self, name: str) -> np.ndarray:
        if name not in self.meta:
            raise HFError(f"{self.path}: tensor {name} is missing")
        with safe_open(self.file_of[name], "np") as f:
            return f.get_tensor(name)


class ShardWriter:
    """Writes tensors, in the order given to the constructor, into shards of at most `max_shard_bytes`.

    The plan is made from the sizes up front, so the shard names (``-of-0000n``) are known before the
    first is written and at most one shard is held in memory."""

    def __init__(self, output: str, sizes: list[tuple[str, int]], max_shard_bytes: int):
        self.output, self.shards, current, used = output, [], [], 0
        for name, nbytes in sizes:
            if current and used + nbytes > max_shard_bytes:
                self.shards.append(current)
                current, used = [], 0
            current.append(name)
            used += nbytes
        self.shards.append(current)
        n = len(self.shards)
        self.file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self.total_size = sum(nbytes for _, nbytes in sizes)
        self.pending: dict[str, np.ndarray] = {}
        self.written = 0

    def add(self, name: str, array: np.ndarray) -> None:
        self.pending[name] = array
        shard = self.shard_of[name]
        if all(n in self.pending for n in self.shards[shard]):
            save_file({n: self.pending.pop(n) for n in self.shards[shard]},
                      os.path.join(self.output, self.file_names[shard]), metadata={"format": "pt"})
            self.written += 1

    def finish(self) -> None:
        if self.written != len(self.shards) or self.pending:
            raise RuntimeError(f"shard writer: {len(self.shards) - self.written} shards incomplete")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.file_names[i] for n, i in sorted(self.shard_of.items())}}
            with open(os.path.join(self.output, INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)

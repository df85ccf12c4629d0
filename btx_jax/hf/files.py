"""Safetensors model directories: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.

Reading goes one tensor at a time (each file's header, then one tensor's byte range), so a
conversion holds one tensor plus whatever it is building, never the whole model; directories may
be URLs (``gs://...``, through :mod:`btx_jax.paths`). Writing follows
``save_pretrained``: shards of at most ``max_shard_bytes``, named ``model-0000k-of-0000n.safetensors``,
with an index mapping every tensor to its shard (a single ``model.safetensors`` when it all fits);
each tensor is appended to its shard as it comes (the package's writer needs a whole shard in memory).
"""
from __future__ import annotations

import json

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16")
import numpy as np

from btx_jax import paths
from btx_jax.hf.hf_config import HFError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def is_hf_dir(path) -> bool:
    path = paths.resolve(path)
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in (INDEX, SINGLE, "pytorch_model.bin"))


def _header(f) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts (8-byte length, then JSON)."""
    size = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(size)), 8 + size


class SafetensorsDir:
    """The tensors of a Hugging Face directory: names, shapes and dtypes up front, data on demand."""

    def __init__(self, path):
        self.path = paths.resolve(path)
        if (self.path / INDEX).is_file():
            files = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            files = None
        else:
            raise HFError(f"{path} has no {SINGLE} or {INDEX} (a pytorch_model.bin is not read: it is a pickle)\n"
                          "  fix: convert it to safetensors first, e.g. with transformers' save_pretrained")
        self.file_of, self.meta, self._where = {}, {}, {}
        for name in sorted(set(files.values())) if files else [SINGLE]:
            full = self.path / name
            if not full.is_file():
                raise HFError(f"{path}: shard {name} listed in {INDEX} is missing\n  fix: download it again")
            with full.open("rb") as f:
                header, start = _header(f)
            for key, info in sorted(header.items()):
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise HFError(f"{path}: tensor {key} has dtype {info['dtype']}; only {sorted(_DTYPES)} are supported")
                self.file_of[key] = full
                self.meta[key] = (tuple(info["shape"]), _DTYPES[info["dtype"]])
                self._where[key] = (start + info["data_offsets"][0], start + info["data_offsets"][1])

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def get(self, name: str) -> np.ndarray:
        if name not in self.meta:
            raise HFError(f"{self.path}: tensor {name} is missing")
        shape, dtype = self.meta[name]
        begin, end = self._where[name]
        array = np.empty(shape, dtype)  # safetensors data is little-endian, as are the hosts this runs on
        if array.nbytes != end - begin:
            raise HFError(f"{self.file_of[name]}: tensor {name} holds {end - begin} bytes, its shape {shape} "
                          f"{dtype} needs {array.nbytes}\n  fix: download the file again")
        buffer, done = memoryview(array.reshape(-1).view(np.uint8)), 0
        with self.file_of[name].open("rb") as f:
            f.seek(begin)
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise HFError(f"{self.file_of[name]}: ends inside tensor {name}\n  fix: download the file again")
                done += n
        return array


_CODES = {v: k for k, v in _DTYPES.items()}


class ShardWriter:
    """Writes tensors, in the order planned, into safetensors shards of at most `max_shard_bytes`.

    The plan is made from the shapes up front, so the shard names (``-of-0000n``) and each shard's
    header are known before its first tensor arrives; every tensor is then appended to its open
    shard as it comes, so memory holds only the tensor being written, whatever the shard size. The
    files are standard safetensors (8-byte header length, JSON header, the data in header order).
    """

    def __init__(self, output, tensors: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int):
        self.output, self.shards, current, used = paths.resolve(output), [], [], 0
        self.spec = {name: (tuple(shape), dtype) for name, shape, dtype in tensors}
        for name, shape, dtype in tensors:
            nbytes = self.nbytes(name)
            if current and used + nbytes > max_shard_bytes:
                self.shards.append(current)
                current, used = [], 0
            current.append(name)
            used += nbytes
        self.shards.append(current)
        n = len(self.shards)
        self.file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self.total_size = sum(self.nbytes(name) for name in self.spec)
        self.order = [name for shard in self.shards for name in shard]
        self.next, self.file = 0, None

    def nbytes(self, name: str) -> int:
        shape, dtype = self.spec[name]
        return int(np.prod(shape)) * np.dtype(dtype).itemsize

    def _open(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.shards[shard]:
            shape, dtype = self.spec[name]
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + self.nbytes(name)]}
            offset += self.nbytes(name)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
        self.file = (self.output / self.file_names[shard]).open("wb")
        self.file.write(len(blob).to_bytes(8, "little") + blob)

    def add(self, name: str, array: np.ndarray) -> None:
        if self.next >= len(self.order) or name != self.order[self.next]:
            raise ValueError(f"shard writer: got {name}, expected {self.order[self.next] if self.next < len(self.order) else 'nothing'}")
        shape, dtype = self.spec[name]
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            raise ValueError(f"shard writer: {name} is {array.shape} {array.dtype}, planned {shape} {dtype}")
        shard = self.shard_of[name]
        if self.shards[shard][0] == name:
            self._open(shard)
        self.file.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
        self.next += 1
        if self.shards[shard][-1] == name:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"shard writer: {len(self.order) - self.next} tensors were never written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.file_names[i] for n, i in sorted(self.shard_of.items())}}
            (self.output / INDEX).write_text(json.dumps(index, indent=2))

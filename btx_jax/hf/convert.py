"""Hugging Face directory -> Orbax checkpoint (import), and back (export).

Both stream: import fills one of our stacked leaves from its per-layer tensors and writes it
before reading the next, so memory is one leaf plus one tensor; export reads one leaf, cuts it
into per-layer tensors and writes each shard as soon as it is complete. Outputs are built under a
temporary name and renamed when complete, so an interrupted conversion never leaves something
that looks finished.
"""
from __future__ import annotations

import datetime
import json
import os

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16")
import numpy as np

import btx_jax
from btx_jax import checkpoint, paths
from btx_jax.hf import byte_tokenizer, names
from btx_jax.hf.files import ShardWriter, SafetensorsDir
from btx_jax.hf.hf_config import HFError, check_exportable, from_hf, read_config, to_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
LOGITS_FILE = "btx_jax_logits.npz"  # our logits on fixed token ids, for scripts/make_hf_fixtures.py --check


def check_tensors(files: SafetensorsDir, entries: list[names.Entry], tied: bool) -> None:
    """Every tensor the model needs is there with the right shape, and nothing else is (refused by name)."""
    expected = {name: entry for entry in entries for _, name in entry.hf_names()}
    problems = [f"  {name}: missing" for name in expected if name not in files]
    problems += [f"  {name}: shape {files.meta[name][0]}, the config implies {expected[name].hf_shape}"
                 for name in expected if name in files and files.meta[name][0] != expected[name].hf_shape]
    for name in files.meta:
        if name in expected or name.endswith(names.DERIVED):
            continue
        if tied and name == "lm_head.weight" and np.array_equal(files.get(name), files.get("model.embed_tokens.weight")):
            continue  # a tied model saved with its (identical) head
        problems.append(f"  {name}: has no place in the model (a bias, or another architecture?)")
    if problems:
        raise HFError(f"{files.path}: the tensors do not fit a Llama/Mixtral model of its config.json:\n"
                      + "\n".join(problems[:20]) + "\n  fix: check that config.json belongs to these weights")


def stacked(files: SafetensorsDir, entry: names.Entry, dtype) -> np.ndarray:
    """Our leaf for `entry`, filled one Hugging Face tensor at a time."""
    leaf = np.empty(entry.shape, dtype)
    for index, name in entry.hf_names():
        # cast first (a contiguous pass), then move: the layout change runs on the target dtype
        leaf[index] = names.to_ours(files.get(name).astype(dtype, copy=False), entry)
    return leaf


def _sections(model_fields: dict, moe_fields: dict, param_dtype: str) -> tuple[dict, dict]:
    """Full model / moe config sections (defaults from base_config) for the imported model."""
    from btx_jax.config import base_config

    base = base_config()
    model = base.model.to_dict() | model_fields | {"param_dtype": param_dtype}
    moe = base.moe.to_dict() | moe_fields
    if moe["num_experts"]:
        moe["dispatcher"] = "dropless"  # Mixtral drops no token; capacity-free evaluation is the same function
    return model, moe


class DenseReader:
    """A Hugging Face Llama directory as a source for the checkpoint surgeon: our param paths and shapes,
    and each stacked leaf read on demand (in the directory's dtype)."""

    def __init__(self, path: str, ignore_fields: tuple[str, ...] = ()):
        model, moe, _ = from_hf(read_config(path), ignore_fields)
        if moe["num_experts"]:
            raise HFError(f"{path} is a Mixtral (MoE) checkpoint; the surgeon merges dense models\n"
                          "  fix: give dense Llama-family directories or btx_jax checkpoints")
        self.files = SafetensorsDir(path)
        entries = names.table(model, moe)
        check_tensors(self.files, entries, model["tie_embeddings"])
        self.entries = {e.ours: e for e in entries}
        self.params = {e.ours: (e.shape, self.files.meta[e.hf_names()[0][1]][1]) for e in entries}

    def read(self, path: str) -> np.ndarray:
        return stacked(self.files, self.entries[path], self.params[path][1])


def import_checkpoint(hf_dir: str, output: str, *, param_dtype: str = "float32", ignore_fields: tuple[str, ...] = (),
                      out=print) -> dict:
    """A Llama/Mistral/Mixtral directory -> a params checkpoint at `output` (``train.init_from``, the
    surgeon's sources, ``export``); returns its manifest, whose model/moe sections are the config to use."""
    hf = read_config(hf_dir)
    model_fields, moe_fields, info = from_hf(hf, ignore_fields)
    model, moe = _sections(model_fields, moe_fields, param_dtype)
    files = SafetensorsDir(hf_dir)
    entries = names.table(model, moe)
    check_tensors(files, entries, model["tie_embeddings"])
    total = sum(int(np.prod(e.shape)) * np.dtype(param_dtype).itemsize for e in entries)
    out(f"[hf] importing {info['kind']} {hf_dir}: {len(files.meta)} tensors -> {len(entries)} params, "
        f"{total / 1e9:.3f} GB {param_dtype} -> {output}")
    with checkpoint.ParamWriter(output, "[hf]", out) as writer:
        for entry in entries:
            writer.write(entry.ours, stacked(files, entry, param_dtype))
        manifest = {
            "format": "btx_jax.hf_import/1", "btx_jax_version": btx_jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model, "moe": moe,
            "hf": {"source": str(paths.resolve(hf_dir)), "config": hf, **info,
                   "ignored_fields": list(ignore_fields)},
        }
        writer.finish(manifest)
    out(f"[hf] wrote {output}; train from it with --config.train.init_from={output} and these model fields:\n"
        + " ".join(f"--config.model.{k}={v}" for k, v in model_fields.items())
        + "".join(f" --config.moe.{k}={v}" for k, v in moe_fields.items() if moe_fields["num_experts"]))
    return manifest


def export_checkpoint(ckpt: str, output: str, *, dtype: str | None = None, max_shard_bytes: int = 2_000_000_000,
                      tokenizer_dir: str | None = None, max_position_embeddings: int | None = None,
                      save_logits: bool = False, out=print) -> dict:
    """Our checkpoint -> a LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) directory; returns its config.json."""
    saved = checkpoint.saved_model_config(ckpt)
    model, moe = saved["model"], saved["moe"]
    check_exportable(model, moe)
    if moe.get("num_experts") and moe.get("dispatcher") != "dropless":
        out(f"[hf] note: trained with the {moe.get('dispatcher')} dispatcher (capacity factor "
            f"{moe.get('train_capacity_factor')}); Mixtral drops no token, so it computes what our dropless "
            "evaluation computes")
    meta = checkpoint.param_metadata(ckpt)
    entries = names.table(model, moe)
    problems = [f"  {e.ours}: {'missing' if e.ours not in meta else f'shape {meta[e.ours][0]}, expected {e.shape}'}"
                for e in entries if e.ours not in meta or tuple(meta[e.ours][0]) != e.shape]
    if problems:
        raise HFError(f"{ckpt}: params do not match its saved config:\n" + "\n".join(problems))
    dtype = dtype or meta["embed/embedding"][1]
    info = saved["hf"]
    tokenizer_dir = tokenizer_dir or info.get("source")
    bos, eos = _special_ids(tokenizer_dir, info)
    output = paths.resolve(output)
    if output.exists():
        raise HFError(f"output {output} already exists\n  fix: remove it or choose another --output")
    scratch = output.parent / f".{output.name}.incomplete"
    _remove(scratch)
    scratch.mkdir(parents=True)
    try:
        tensors = [(name, e.hf_shape, dtype) for e in entries for _, name in e.hf_names()]
        writer = ShardWriter(scratch, tensors, max_shard_bytes)
        out(f"[hf] exporting {ckpt} -> {output}: {len(tensors)} tensors, {writer.total_size / 1e9:.3f} GB {dtype}, "
            f"{len(writer.file_names)} shard(s)")
        for entry in entries:
            leaf = checkpoint.read_param(ckpt, entry.ours, *meta[entry.ours]).astype(dtype, copy=False)
            for index, name in entry.hf_names():
                writer.add(name, names.to_hf(leaf[index], entry))
            del leaf
        writer.finish()
        config = to_hf(model, moe, dtype=dtype, bos_token_id=bos, eos_token_id=eos,
                       max_position_embeddings=max_position_embeddings or info.get("max_position_embeddings") or 4096)
        _write_json(scratch / "config.json", config)
        _write_json(scratch / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        copied = _copy_tokenizer(tokenizer_dir, scratch)
        if not copied and saved["tokenizer"] == "byte":
            copied = byte_tokenizer.write(scratch)
            tokenizer_dir = "btx_jax's byte tokenizer"
        if save_logits:
            _save_logits(ckpt, model, moe, dtype, scratch)
        scratch.rename(output)  # on GCS a copy of each file: the output appears when complete
    except BaseException:
        _remove(scratch)
        raise
    out(f"[hf] wrote {output} ({config['architectures'][0]}"
        + (f", tokenizer from {tokenizer_dir}" if copied else ", no tokenizer files: see README 'Hugging Face'") + ")")
    return config


def _write_json(path, value) -> None:
    path.write_text(json.dumps(value, indent=2))


def _remove(path) -> None:
    if path.exists():
        path.rmtree()


def _special_ids(tokenizer_dir, info: dict) -> tuple[int, int]:
    """BOS / EOS ids: the imported checkpoint's, a tokenizer directory's config.json, else ours (1, 2)."""
    from btx_jax.data.tokenizer import BOS_ID, EOS_ID

    if info.get("bos_token_id") is not None or info.get("eos_token_id") is not None:
        return info.get("bos_token_id"), info.get("eos_token_id")
    if tokenizer_dir and paths.resolve(tokenizer_dir).is_dir():
        from btx_jax.data.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(tokenizer_dir)
        return tokenizer.bos_id, tokenizer.eos_id
    return BOS_ID, EOS_ID


def _copy_tokenizer(tokenizer_dir, output) -> list[str]:
    if not tokenizer_dir or not paths.resolve(tokenizer_dir).is_dir():
        return []
    source = paths.resolve(tokenizer_dir)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        (output / name).write_bytes((source / name).read_bytes())
    return copied


def _save_logits(ckpt: str, model: dict, moe: dict, dtype: str, output) -> None:
    """Our float32 logits (MoE: dropless), computed from the weights as exported (rounded to `dtype`), on
    fixed random token ids and, when the export has a tokenizer, on a piece of real text with its NLL:
    what ``scripts/make_hf_fixtures.py --check`` compares with transformers."""
    import jax
    from flax import nnx

    from btx_jax import sharding
    from btx_jax.config import base_config
    from btx_jax.data.tokenizer import HFTokenizer
    from btx_jax.state import make_setup

    c = base_config()
    c.model.update(model | {"dtype": "float32", "param_dtype": "float32"})
    c.moe.update(moe | ({"dispatcher": "dropless"} if moe.get("num_experts") else {}))
    c.mesh.update(data=1)
    setup = make_setup(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    params = jax.tree.map(lambda p: p.astype(dtype).astype("float32"),
                          checkpoint.load_params(ckpt, setup.abstract_params))
    model_fn = nnx.merge(setup.graphdef, params)
    arrays = {"input_ids": np.random.default_rng(0).integers(0, model["vocab_size"], (2, 24)).astype(np.int32)}
    if (output / "tokenizer.json").is_file() or (output / "tokenizer.model").is_file():
        tokenizer = HFTokenizer(output)
        module = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "router.py")
        with open(module, encoding="utf-8") as f:  # local: a file of this package
            text = f.read()[:2000]
        ids = tokenizer.encode(text)[:255]
        arrays |= {"text": np.asarray(text), "text_ids": np.asarray(
            ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids.tolist(), np.int32)[None]}
    with sharding.use_mesh(setup.mesh):
        arrays["logits"] = np.asarray(model_fn(arrays["input_ids"])[0], np.float32)
        if "text_ids" in arrays:
            logits = np.asarray(model_fn(arrays["text_ids"])[0], np.float64)[0, :-1]
            targets = arrays["text_ids"][0, 1:]
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            arrays["text_nll"] = np.asarray(np.mean(logz - logits[np.arange(len(targets)), targets]))
    with (output / LOGITS_FILE).open("wb") as f:
        np.savez(f, **arrays)

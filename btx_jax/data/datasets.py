"""TFDS builders (ArrayRecord, no TensorFlow needed) and the per-domain random-access sources.

A domain's source is one of
  ``demo:<code|math|prose|docs>``   the offline demo corpus (see demo_sources.py for provenance),
  ``files:<glob>[,<glob>...]`` the user's own ``.txt`` (one document per file) or ``.jsonl``
                               (one document per line, field ``text``) files, local or ``gs://``,
  ``tfds:<name>``              any TFDS dataset already prepared as ArrayRecord with a
                               ``text`` feature.
Each has a ``train`` and an ``eval`` split; records are ``{"text": bytes}``.

``data.data_dir`` may be a URL (``gs://...``): TFDS and array_record read ArrayRecord from GCS, but
array_record cannot write there, so a missing demo/files dataset is built in a local temporary
directory and copied up (its ``dataset_info.json`` last, so it looks prepared only when complete).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import tensorflow_datasets as tfds

from btx_jax import paths
from btx_jax.data import demo_sources

log = logging.getLogger(__name__)

EVAL_FRACTION = 0.05
_TEXT_FEATURES = tfds.features.FeaturesDict({"text": tfds.features.Text()})


class DataError(ValueError):
    """Training data is missing, empty or unreadable; the message says how to fix it."""


def _stable_fraction(key: str) -> float:
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0x100000000


class DemoCorpus(tfds.core.GeneratorBasedBuilder):
    """The demo corpus: one config per domain (code, math, prose, docs)."""

    name = "btx_demo"
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "code, math, prose.",
                     "1.1.0": "docs (the documentation's help topics); pydoc_data left out of code.",
                     "1.2.0": "code and docs split by family of near duplicates (e.g. the codec tables, "
                              "a topic and the chapter containing it), so no eval source is a near copy "
                              "of a training one."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=demo_sources.PROVENANCE[d])
                       for d in demo_sources.DOMAINS]

    def _info(self):
        return self.dataset_info_from_configs(features=_TEXT_FEATURES, description=self.builder_config.description)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "eval")}

    def _generate_examples(self, split):
        for doc_id, text in demo_sources.documents(self.builder_config.name, split):
            yield doc_id, {"text": text}


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    patterns: tuple[str, ...] = ()


def _expand(patterns) -> list[str]:
    return sorted({path for p in patterns for path in (_expand_url(p) if paths.is_url(p) else _expand_local(p))
                   if paths.resolve(path).is_file()})


def _expand_local(pattern: str) -> list[str]:
    return glob.glob(os.path.expanduser(pattern), recursive=True)  # local: not a URL


def _expand_url(pattern: str) -> list[str]:
    """A ``gs://`` glob (``*``, ``?``, ``[...]``; no ``**``, which would list a whole bucket)."""
    wild = re.search(r"[*?\[]", pattern)
    if not wild:
        return [pattern]
    if "**" in pattern:
        raise DataError(f"{pattern}: a recursive ** is not supported for URLs; name each directory level "
                        "with * (e.g. gs://bucket/corpus/*/*.jsonl)")
    base = pattern[:wild.start()].rpartition("/")[0]
    return [str(p) for p in paths.resolve(base).glob(pattern[len(base) + 1:])]


def _fingerprint(files) -> str:
    """Changes when any matched file is added, removed or modified, so a stale build is not reused."""
    h = hashlib.md5()
    for path in files:
        p = paths.resolve(path)
        if paths.is_url(p):
            st = p.stat()
            h.update(f"{p}:{st.length}:{st.mtime}".encode())
        else:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _read_documents(path: str, stats: dict):
    """(key, text) pairs of one file; invalid UTF-8 is replaced (and counted), never fatal."""
    def decode(raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.setdefault("invalid_utf8", []).append(where)
            return raw.decode("utf-8", errors="replace")

    with paths.resolve(path).open("rb") as f:
        if not path.endswith(".jsonl"):
            yield path, decode(f.read(), path)
            return
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(decode(raw, where))
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{where}: not a JSON object with a 'text' field ({e}); "
                                "each line of a .jsonl file must look like {\"text\": \"...\"}") from None
            yield where, str(text)


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """A user's own text/JSONL files as one domain; ~5% of documents (by hash) held out for eval."""

    name = "btx_text_files"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [TextFilesConfig(name="default")]

    def _info(self):
        return self.dataset_info_from_configs(features=_TEXT_FEATURES)

    def _split_generators(self, dl_manager):
        self.stats = {}
        return {split: self._generate_examples(split) for split in ("train", "eval")}

    def _generate_examples(self, split):
        paths = _expand(self.builder_config.patterns)
        for path in paths:
            for key, text in _read_documents(path, self.stats):
                if text.strip() and (_stable_fraction(key) < EVAL_FRACTION) == (split == "eval"):
                    yield key, {"text": text}


def _build(builder, domain: str) -> None:
    log.info("building domain '%s' into %s", domain, builder.data_dir)
    print(f"[data] building domain '{domain}' -> {builder.data_dir}", flush=True)
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except AssertionError as e:  # tfds refuses to write a split with no examples
        empty = re.search(r'split "([^"]+)": No examples were yielded', str(e))
        if not empty:
            raise
        raise DataError(f"domain '{domain}' has no documents in its '{empty.group(1)}' split; add data (a files: "
                        f"domain holds out ~{EVAL_FRACTION:.0%} of its documents for eval, so give it a few dozen "
                        "at least), or remove the domain from the config") from None
    # each file is read once per split: count every bad document once
    bad = list(dict.fromkeys(getattr(builder, "stats", {}).get("invalid_utf8", [])))
    if bad:
        print(f"[data] warning: domain '{domain}': {len(bad)} document(s) were not valid UTF-8; invalid bytes "
              f"were replaced with U+FFFD (first: {bad[0]})", flush=True)


def domain_builder(domain: str, spec: str, data_dir: str):
    """The TFDS builder behind one domain spec (not built yet)."""
    kind, _, arg = spec.partition(":")
    data_dir = _data_dir(domain, data_dir)
    if kind == "demo":
        if arg not in demo_sources.DOMAINS:
            raise DataError(f"domain '{domain}': unknown demo domain '{arg}'; use one of {demo_sources.DOMAINS}")
        return DemoCorpus(config=arg, data_dir=data_dir)
    if kind == "files":
        patterns = tuple(p for p in arg.split(",") if p)
        paths = _expand(patterns)
        if not paths:
            raise DataError(f"domain '{domain}': no files match {list(patterns)}; check the path in data.domains.{domain}")
        config = TextFilesConfig(name=f"{domain}-{_fingerprint(paths)}", patterns=patterns)
        return TextFiles(config=config, data_dir=data_dir)
    if kind == "tfds":
        try:
            return tfds.builder(arg, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for unknown/unprepared datasets
            raise DataError(f"domain '{domain}': cannot open TFDS dataset '{arg}' in {data_dir}: {e}") from None
    raise DataError(f"domain '{domain}': unknown source kind '{kind}' in {spec!r}")


def _data_dir(domain: str, data_dir: str) -> str:
    if not data_dir:
        return data_dir  # TFDS's default
    try:
        return str(paths.resolve(data_dir))
    except ValueError as e:
        raise DataError(f"domain '{domain}': data.data_dir: {e}") from None


def _build_and_upload(domain: str, spec: str, builder) -> None:
    """Builds locally, then copies the prepared files to the URL data_dir, the JSON metadata last."""
    target = paths.resolve(builder.data_path)
    with tempfile.TemporaryDirectory(prefix="btx_data_") as local:
        local_builder = domain_builder(domain, spec, local)
        _build(local_builder, domain)
        source = str(local_builder.data_path)
        files = sorted((os.path.relpath(os.path.join(root, name), source) for root, _, names in os.walk(source)
                        for name in names), key=lambda name: (name.endswith(".json"), name))
        print(f"[data] copying {len(files)} files -> {target}", flush=True)
        for name in files:
            dst = target / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(source, name), "rb") as src, dst.open("wb") as out:  # local: a temporary file
                shutil.copyfileobj(src, out, 1 << 24)


def _split_name(builder, split: str) -> str:
    names = set(builder.info.splits.keys())
    candidates = ["train"] if split == "train" else ["eval", "validation", "test"]
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"dataset {builder.info.full_name} has splits {sorted(names)}, none of {candidates}")


def open_domain(domain: str, spec: str, data_dir: str, split: str, build_if_missing: bool = True):
    """Random-access source (len, __getitem__ -> {'text': bytes}) for one domain and split."""
    builder = domain_builder(domain, spec, data_dir)
    if not builder.is_prepared():
        buildable = not spec.startswith("tfds:")
        if not (build_if_missing and buildable):
            how = ("set data.build_if_missing=True or run `python -m btx_jax.data.build --config <config>`"
                   if buildable else "prepare it as ArrayRecord first (tfds `download_and_prepare(file_format="
                   "'array_record')`) or fix data.data_dir")
            raise DataError(f"domain '{domain}': dataset {builder.info.full_name} not found in data_dir "
                            f"'{data_dir}'; {how}")
        if paths.is_url(builder.data_dir):
            _build_and_upload(domain, spec, builder)
            builder = domain_builder(domain, spec, data_dir)  # reads the uploaded dataset_info.json
        else:
            _build(builder, domain)
    try:
        source = builder.as_data_source(split=_split_name(builder, split))
    except (ValueError, NotImplementedError) as e:
        raise DataError(f"domain '{domain}': {builder.info.full_name} cannot be read as ArrayRecord ({e}); "
                        "rebuild it with file_format='array_record'") from None
    if len(source) == 0:
        raise DataError(f"domain '{domain}' ({spec}) has no documents in its '{split}' split; add data, "
                        "or remove the domain from the config")
    return source

"""The data layer: tokenizer, TFDS builders for the user's files and the demo corpus, and the
grain pipeline (packing, mixture, determinism, checkpointable state, per-process shards)."""
from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
from ml_collections import ConfigDict

from btx_jax.config import base_config, validate
from btx_jax.data import build, datasets, demo_sources, pipeline
from btx_jax.data.datasets import DataError
from btx_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, encode_document

SEQ_LEN, BATCH = 32, 8
TOK = ByteTokenizer()


# ----------------------------------------------------------------------------- helpers


def short_docs(prefix: str, n: int) -> list[str]:
    """Unique documents of at most 28 bytes, so [BOS] doc [EOS] always fits one packed row."""
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    docs = [f"{prefix}-{i:03d} " + " ".join(words[: i % 4 + 1]) for i in range(n)]
    assert all(len(d.encode()) <= 28 for d in docs)
    return docs


def write_jsonl(path, texts) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def data_config(data_dir, domains: dict, **overrides) -> ConfigDict:
    c = base_config()
    c.data.data_dir = str(data_dir)
    c.data.domains = ConfigDict(domains)
    c.data.update(seq_len=SEQ_LEN, batch_size=BATCH, **overrides)
    return validate(c).data


def texts(source) -> list[str]:
    return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def row_documents(batch: dict, row: int) -> list[str]:
    """The texts of the documents packed in one row (BOS/EOS stripped), from inputs + last target."""
    seg, inputs = batch["segment_ids"][row], batch["inputs"][row]
    docs = []
    for s in [s for s in np.unique(seg) if s != 0]:
        ids = list(inputs[seg == s])
        if seg[-1] == s:  # the segment runs to the row's end: its last token is only in targets
            ids.append(batch["targets"][row, -1])
        docs.append(TOK.decode(ids))
    return docs


def batch_documents(batch: dict) -> list[str]:
    return [d for row in range(batch["inputs"].shape[0]) for d in row_documents(batch, row)]


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two built files: domains 'a' and 'b' of short unique documents."""
    root = tmp_path_factory.mktemp("two_domains")
    docs = {"a": short_docs("a", 300), "b": short_docs("b", 300)}
    for name, ds in docs.items():
        (root / name).mkdir()
        write_jsonl(root / name / "docs.jsonl", ds)
    domains = {name: f"files:{root / name / '*.jsonl'}" for name in docs}
    config = data_config(root / "tfds", domains)
    return config, pipeline.open_sources(config, "train"), docs


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trips_unicode():
    """Any UTF-8 text (accents, CJK, emoji) encodes to ids 3..258 and decodes back exactly."""
    text = "naïve café — 你好, мир 🎉\n\ttabs"
    ids = TOK.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.min() >= 3 and ids.max() <= 258
    assert TOK.decode(ids) == text
    assert TOK.encode(text.encode("utf-8")).tolist() == ids.tolist()  # bytes in, same ids
    assert TOK.vocab_size == 259


def test_encode_document_adds_bos_and_eos():
    """Documents are framed [BOS] text [EOS] so the model learns where documents start and end."""
    ids = encode_document(TOK, "héllo")
    assert ids[0] == BOS_ID == 1 and ids[-1] == EOS_ID == 2 and PAD_ID == 0
    assert ids[1:-1].tolist() == TOK.encode("héllo").tolist()
    assert TOK.decode(ids) == "héllo"  # special ids are dropped by decode


# ---------------------------------------------------------------------- files: domains


def _write_mixed_files(root) -> list[tuple[str, str]]:
    """40 .txt files and a 260-line .jsonl (with a blank line); returns (key, text) per document."""
    root.mkdir()
    written = []
    for i in range(40):
        path = root / f"doc{i:02d}.txt"
        text = f"Text file {i}.\nSecond line: ünïcødé ✓ {i * 7}\n"
        path.write_text(text, encoding="utf-8")
        written.append((str(path), text))
    jsonl = root / "lines.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(260):
            text = f"json document {i} — {'x' * (i % 9)}"
            f.write(json.dumps({"text": text, "id": i}) + "\n")
            written.append((f"{jsonl}:{i + 1}", text))
        f.write("\n")  # trailing blank line: skipped, not an error
    return written


def test_files_domain_keeps_exactly_the_documents_written(tmp_path):
    """A files: domain over .txt and .jsonl builds with TextFiles; train + eval hold every
    document once, and eval is exactly the ~5% chosen by the stable hash of each document's key."""
    written = _write_mixed_files(tmp_path / "src")
    spec = f"files:{tmp_path / 'src' / '*.txt'},{tmp_path / 'src' / '*.jsonl'}"
    builder = datasets.domain_builder("mine", spec, str(tmp_path / "tfds"))
    assert isinstance(builder, datasets.TextFiles)
    train = texts(datasets.open_domain("mine", spec, str(tmp_path / "tfds"), "train"))
    evals = texts(datasets.open_domain("mine", spec, str(tmp_path / "tfds"), "eval"))
    assert len(train) + len(evals) == len(written) == 300
    assert sorted(train + evals) == sorted(t for _, t in written)
    assert not set(train) & set(evals)
    expected_eval = {t for key, t in written if datasets._stable_fraction(key) < datasets.EVAL_FRACTION}
    assert set(evals) == expected_eval
    assert 1 <= len(evals) <= 36  # ~5% of 300


def test_files_eval_split_is_deterministic(tmp_path):
    """Building the same files again (another data_dir) puts the same documents in eval."""
    _write_mixed_files(tmp_path / "src")
    spec = f"files:{tmp_path / 'src' / '*'}"
    first = texts(datasets.open_domain("d", spec, str(tmp_path / "tfds1"), "eval"))
    second = texts(datasets.open_domain("d", spec, str(tmp_path / "tfds2"), "eval"))
    assert first and sorted(first) == sorted(second)


def test_invalid_utf8_is_replaced_and_reported(tmp_path, capsys):
    """A .txt file with invalid bytes builds, its bad bytes become U+FFFD and a warning names it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.txt").write_bytes(b"hello \xff\xfe world \xc3")
    write_jsonl(src / "ok.jsonl", [f"fine document {i}" for i in range(300)])
    spec = f"files:{src / '*.txt'},{src / '*.jsonl'}"
    docs = (texts(datasets.open_domain("u", spec, str(tmp_path / "tfds"), "train"))
            + texts(datasets.open_domain("u", spec, str(tmp_path / "tfds"), "eval")))
    assert len(docs) == 301
    assert "hello \ufffd\ufffd world \ufffd" in docs
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "not valid UTF-8" in line]
    assert len(warning) == 1
    assert "domain 'u'" in warning[0] and "U+FFFD" in warning[0] and str(src / "bad.txt") in warning[0]


def test_invalid_utf8_warning_counts_each_document_once(tmp_path, capsys):
    """The warning's count is the number of bad documents (not doubled by the two split passes)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.txt").write_bytes(b"caf\xe9")
    write_jsonl(src / "ok.jsonl", [f"fine document {i}" for i in range(300)])
    datasets.open_domain("u", f"files:{src / '*.txt'},{src / '*.jsonl'}", str(tmp_path / "tfds"), "train")
    warning = [line for line in capsys.readouterr().out.splitlines() if "not valid UTF-8" in line]
    assert len(warning) == 1
    assert "domain 'u': 1 document(s) were not valid UTF-8" in warning[0]


@pytest.mark.parametrize("bad_line, reason", [("this is not json", "Expecting value"),
                                              ('{"body": "no text field"}', "'text'")])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, reason):
    """A .jsonl line that is not JSON or lacks "text" fails with DataError at file:line."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        datasets.open_domain("j", f"files:{path}", str(tmp_path / "tfds"), "train")
    message = str(info.value)
    assert f"{path}:4" in message
    assert reason in message
    assert '{"text": "..."}' in message


# ---------------------------------------------------------------------- train iterator


def test_train_batches_have_documented_layout(two_domains):
    """Batches: int32 inputs/targets/segment_ids/positions [B, T], float32 loss_mask, int32 domain [B];
    targets are inputs shifted; the mask is exactly 'same non-pad segment'; positions restart per
    segment; every row holds whole documents of the one domain it is labelled with."""
    config, sources, docs = two_domains
    it = pipeline.train_iterator(config, sources)
    names = pipeline.domain_names(config)
    assert names == ["a", "b"]
    for _ in range(4):
        batch = next(it)
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "domain"}
        for key in ("inputs", "targets", "segment_ids", "positions"):
            assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == np.int32, key
        assert batch["loss_mask"].shape == (BATCH, SEQ_LEN) and batch["loss_mask"].dtype == np.float32
        assert batch["domain"].shape == (BATCH,) and batch["domain"].dtype == np.int32

        seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        both = (mask[:, :-1] == 1) & (mask[:, 1:] == 1) & (seg[:, :-1] == seg[:, 1:])
        assert both.sum() > 0
        np.testing.assert_array_equal(batch["inputs"][:, 1:][both], batch["targets"][:, :-1][both])
        # the mask: a target counts iff the next token continues the same (non-pad) segment
        np.testing.assert_array_equal(mask[:, :-1] == 1, (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0))
        assert np.all(mask[seg == 0] == 0)
        # positions: 0 at each segment start, +1 inside a segment
        starts = (seg != 0) & np.concatenate([np.ones((BATCH, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert np.all(pos[starts] == 0)
        inside = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        assert np.all(pos[:, 1:][inside] == pos[:, :-1][inside] + 1)
        assert np.all(batch["inputs"][starts] == BOS_ID)
        # each row: whole documents, all from the row's domain
        for row in range(BATCH):
            name = names[batch["domain"][row]]
            row_docs = row_documents(batch, row)
            assert row_docs, row
            assert all(d in docs[name] for d in row_docs), (name, row_docs)


def test_mixture_follows_the_weights(two_domains):
    """Weights {a: 3, b: 1}: about 75% of packed rows come from 'a' over 200 batches."""
    config, sources, docs = two_domains
    config = config.copy_and_resolve_references()
    config.weights = ConfigDict({"a": 3.0, "b": 1.0})
    it = pipeline.train_iterator(config, sources)
    domains = np.concatenate([next(it)["domain"] for _ in range(200)])
    assert set(np.unique(domains)) == {0, 1}
    assert abs(np.mean(domains == 0) - 0.75) < 0.05


def test_zero_weight_domain_never_appears(two_domains):
    """A domain with weight 0 contributes no rows and none of its documents."""
    config, sources, docs = two_domains
    config = config.copy_and_resolve_references()
    config.weights = ConfigDict({"a": 0.0, "b": 1.0})
    it = pipeline.train_iterator(config, sources)
    batches = [next(it) for _ in range(40)]
    assert all(np.all(b["domain"] == 1) for b in batches)
    seen = {d for b in batches for d in batch_documents(b)}
    assert seen and seen <= set(docs["b"])


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_iterator_state_restores_the_same_batches(two_domains):
    """get_state after 5 batches, then set_state on a fresh iterator: the next 5 batches match."""
    config, sources, _ = two_domains
    it = pipeline.train_iterator(config, sources)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh = pipeline.train_iterator(config, sources)
    fresh.set_state(state)
    _assert_batches_equal([next(fresh) for _ in range(5)], expected)
    # and the restored stream is not simply the start of the stream
    restart = pipeline.train_iterator(config, sources)
    assert not np.array_equal(next(restart)["inputs"], expected[0]["inputs"])


def test_same_seed_same_batches_other_seed_other_batches(two_domains):
    """Two fresh iterators with one seed agree exactly; another data.seed changes the order."""
    config, sources, _ = two_domains
    one, two = pipeline.train_iterator(config, sources), pipeline.train_iterator(config, sources)
    first = [next(one) for _ in range(6)]
    _assert_batches_equal(first, [next(two) for _ in range(6)])
    other = config.copy_and_resolve_references()
    other.seed = 1
    it = pipeline.train_iterator(other, sources)
    assert not all(np.array_equal(next(it)["inputs"], b["inputs"]) for b in first)


def test_processes_read_disjoint_documents(two_domains):
    """data.shards=2, one shard per process: batch_size // 2 rows each, from disjoint documents."""
    config, sources, docs = two_domains
    config = copy.deepcopy(config)
    config.shards = 2
    seen = []
    for index in range(2):
        it = pipeline.train_iterator(config, sources, shards=[index])
        batches = [next(it) for _ in range(10)]
        for b in batches:
            assert b["inputs"].shape == (BATCH // 2, SEQ_LEN)
            assert b["domain"].shape == (BATCH // 2,)
        seen.append({d for b in batches for d in batch_documents(b)})
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(docs["a"]) | set(docs["b"])


def test_the_global_batch_does_not_depend_on_how_processes_split_the_shards(two_domains):
    """With data.shards fixed, one process reading every shard sees exactly the rows that two processes
    (one shard each) see together: a run resumes on another process count with the same data, and
    state save/restore works across the zipped shards."""
    config, sources, _ = two_domains
    config = copy.deepcopy(config)
    config.shards = 2
    whole = pipeline.train_iterator(config, sources)
    halves = [pipeline.train_iterator(config, sources, shards=[i]) for i in range(2)]
    for _ in range(4):
        batch, parts = next(whole), [next(h) for h in halves]
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    state = whole.get_state()
    after = [next(whole) for _ in range(2)]
    whole.set_state(state)
    for expected in after:
        np.testing.assert_array_equal(next(whole)["inputs"], expected["inputs"])


# ------------------------------------------------------------------------------ eval


def test_eval_batches_are_deterministic(two_domains):
    """The held-out batches are identical on every call (every evaluation sees the same tokens)."""
    config, _, _ = two_domains
    source = pipeline.open_sources(config, "eval")["a"]
    first = pipeline.eval_batches(config, source, 0, 2)
    assert first
    _assert_batches_equal(first, pipeline.eval_batches(config, source, 0, 2))
    assert all(np.all(b["domain"] == 0) for b in first)


def test_small_eval_split_is_padded_with_empty_rows(two_domains):
    """Three short documents -> one batch of full batch_size rows, the extra rows empty (no loss)."""
    config, _, _ = two_domains
    docs = ["first doc", "second doc", "third one"]
    source = [{"text": d.encode()} for d in docs]
    batches = pipeline.eval_batches(config, source, 1, num_batches=4)
    assert len(batches) == 1  # the split runs out; no invented batches
    batch = batches[0]
    assert batch["inputs"].shape == (BATCH, SEQ_LEN) and batch["domain"].shape == (BATCH,)
    real = batch["segment_ids"].any(axis=1)
    assert 1 <= real.sum() < BATCH
    empty = ~real
    assert np.all(batch["loss_mask"][empty] == 0) and np.all(batch["inputs"][empty] == PAD_ID)
    assert sorted(batch_documents(batch)) == sorted(docs)
    assert batch["loss_mask"].sum() == sum(len(d) + 1 for d in docs)  # text bytes + EOS per document
    assert np.all(batch["domain"][real] == 1)


# -------------------------------------------------------------------------- demo corpus


def test_demo_corpus_builds_each_domain(tmp_path, monkeypatch):
    """demo:code/math/prose build with DemoCorpus into data_dir (200 documents per split here):
    code looks like Python, math has worked answers, prose does not."""
    real_documents = demo_sources.documents
    calls = []

    def limited(domain, split, **kwargs):
        calls.append((domain, split))
        return real_documents(domain, split, **{**kwargs, "limit": 200})

    monkeypatch.setattr(demo_sources, "documents", limited)
    data_dir = str(tmp_path / "tfds")
    corpus = {}
    for domain in ("code", "math", "prose"):
        builder = datasets.domain_builder(domain, f"demo:{domain}", data_dir)
        assert isinstance(builder, datasets.DemoCorpus)
        train = texts(datasets.open_domain(domain, f"demo:{domain}", data_dir, "train"))
        evals = texts(datasets.open_domain(domain, f"demo:{domain}", data_dir, "eval"))
        assert 0 < len(train) <= 200 and 0 < len(evals) <= 200
        assert not set(train) & set(evals)
        corpus[domain] = train + evals
    assert sorted(calls) == sorted((d, s) for d in ("code", "math", "prose") for s in ("train", "eval"))
    assert os.path.isdir(os.path.join(data_dir, "btx_demo", "math", str(datasets.DemoCorpus.VERSION)))

    code_like = [t for t in corpus["code"] if re.search(r"^\s*(def |class |import |from \S+ import )", t, re.M)]
    assert len(code_like) >= 0.5 * len(corpus["code"])
    assert sum("Answer:" in t for t in corpus["math"]) >= 0.9 * len(corpus["math"])
    assert not any("Answer:" in t for t in corpus["prose"])
    assert not any(re.search(r"^\s*def \w+\(", t, re.M) for t in corpus["prose"])


# ------------------------------------------------------------------------------ build


def test_build_all_counts_files_domains(tmp_path):
    """build_all builds training and eval-only domains and reports their document counts."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", short_docs("a", 300))
    write_jsonl(src / "b.jsonl", short_docs("b", 400))
    write_jsonl(src / "held.jsonl", short_docs("h", 320))
    config = data_config(tmp_path / "tfds", {"a": f"files:{src / 'a.jsonl'}", "b": f"files:{src / 'b.jsonl'}"},
                         build_if_missing=False)
    config.eval_domains = ConfigDict({"held": f"files:{src / 'held.jsonl'}"})
    counts = build.build_all(config)
    assert set(counts) == {"a", "b", "held"}
    for name, total in (("a", 300), ("b", 400), ("held", 320)):
        assert counts[name]["train"] + counts[name]["eval"] == total
        assert counts[name]["eval"] >= 1
    # built once: opening without building now works and agrees with the counts
    assert config.build_if_missing is False
    sources = pipeline.open_sources(config, "eval", ["a", "b", "held"])
    assert {n: len(s) for n, s in sources.items()} == {n: c["eval"] for n, c in counts.items()}


def test_eval_token_budget_and_document_ids(two_domains):
    """max_tokens: the shortest prefix of batches that scores the budget; every scored token names its
    document (1 + its index in the split), and the documents' texts are the split's own, in order."""
    config, _, _ = two_domains
    source = pipeline.open_sources(config, "eval")["a"]
    whole = pipeline.eval_batches(config, source, 0)
    total = sum(b["loss_mask"].sum() for b in whole)
    budget = int(total // 3)
    some = pipeline.eval_batches(config, source, 0, max_tokens=budget)
    scored = [b["loss_mask"].sum() for b in some]
    assert sum(scored) >= budget > sum(scored[:-1])
    _assert_batches_equal(some, whole[:len(some)])
    docs = np.concatenate([b["document"][b["segment_ids"] > 0] for b in whole])
    assert docs.min() >= 1 and set(np.unique(docs)) == set(range(1, len(source) + 1))
    assert np.all((whole[0]["document"] == 0) == (whole[0]["segment_ids"] == 0))
    batch = whole[0]
    for row in range(batch["inputs"].shape[0]):
        for seg in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
            (doc,) = np.unique(batch["document"][row][batch["segment_ids"][row] == seg])
            text = source[int(doc) - 1]["text"].decode()
            assert text in row_documents(batch, row)

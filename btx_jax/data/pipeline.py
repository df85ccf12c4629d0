"""grain input pipelines: per-domain shuffle/repeat -> tokenize -> chunk -> pack, then mix.

Each domain is packed on its own and the packed rows are mixed with the domain weights, so
the weights are *token* proportions (mixing documents would over-weight domains with long
documents) and every row holds one domain, which later lets routing be analysed by domain.

A packed row has ``seq_len + 1`` tokens; the model reads the first ``seq_len`` and predicts
the last ``seq_len``. Batches are dicts of numpy arrays:
  inputs, targets, segment_ids, positions: int32 [B, T];  loss_mask: float32 [B, T];
  domain: int32 [B] (index into the sorted domain names);
  eval batches also: document: int32 [B, T], 1 + the source index of the document each input
  token comes from (0: padding), so scores can be summed per document (bootstrap intervals).
"""
from __future__ import annotations

import grain
import numpy as np

from btx_jax import distributed
from btx_jax.config import domain_weights
from btx_jax.data.datasets import open_domain
from btx_jax.data.tokenizer import encode_document, make_tokenizer


class ChunkDocuments(grain.experimental.FlatMapTransform):
    """Tokenizes one document and cuts it into pieces of at most `chunk_len` tokens."""

    def __init__(self, tokenizer, chunk_len: int, max_chunks: int):
        self.tokenizer, self.chunk_len, self.max_fan_out = tokenizer, chunk_len, max_chunks

    def flat_map(self, record):
        ids = encode_document(self.tokenizer, record["text"])[: self.chunk_len * self.max_fan_out]
        chunks = [{"tokens": ids[i:i + self.chunk_len]} for i in range(0, len(ids), self.chunk_len)]
        if "document" in record:  # eval: carry the document's id through packing
            for chunk in chunks:
                chunk["document"] = np.full(len(chunk["tokens"]), record["document"], np.int32)
        return chunks


def to_model_batch(rows: dict) -> dict:
    """Packed rows of seq_len + 1 tokens -> shifted inputs/targets with a loss mask.

    A target counts only if it continues the same document as its input token, so no
    token is ever predicted across a document boundary or into padding.
    """
    tokens, seg, pos = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    batch = {
        "inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": seg[:, :-1].astype(np.int32), "positions": pos[:, :-1].astype(np.int32),
        "loss_mask": mask.astype(np.float32), "domain": rows["domain"][:, 0].astype(np.int32),
    }
    if "document" in rows:
        batch["document"] = np.where(seg[:, :-1] != 0, rows["document"][:, :-1] + 1, 0).astype(np.int32)
    return batch


def _packed_rows(ds: grain.IterDataset, data_config, tokenizer, domain_index: int, *, shuffle: bool,
                 documents: bool = False):
    row_len = data_config.seq_len + 1
    ds = grain.experimental.FlatMapIterDataset(
        ds, ChunkDocuments(tokenizer, row_len, data_config.max_chunks_per_doc))
    lengths = {"tokens": row_len, **({"document": row_len} if documents else {})}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=data_config.packing_bins or data_config.batch_size,
        seed=data_config.seed + domain_index, shuffle_bins=shuffle)
    return ds.map(lambda row: {**{k: v for k, v in row.items() if not k.startswith("document_")},
                               "domain": np.full((row_len,), domain_index, np.int32)})


def domain_names(data_config) -> list[str]:
    return sorted(data_config.domains.keys())


def open_sources(data_config, split: str, names=None) -> dict:
    """Opens (building if needed and allowed) every domain's source before training starts. In a
    multi-process job process 0 builds what is missing while the others wait, then they open it."""
    specs = {**dict(data_config.domains), **dict(data_config.eval_domains)}
    names = domain_names(data_config) if names is None else names

    def open_all():
        return {name: open_domain(name, specs[name], data_config.data_dir, split, data_config.build_if_missing)
                for name in names}

    sources = open_all() if distributed.is_main() else None
    distributed.barrier(f"data {split} {','.join(names)}")
    return sources if sources is not None else open_all()


def train_iterator(data_config, sources: dict, shards: list[int] | None = None):
    """Infinite, checkpointable iterator of this process's rows of each global batch: the rows of data
    shards `shards` (indices in ``range(num_shards(data_config))``, in row order; default all)."""
    tokenizer = make_tokenizer(data_config)
    weights = domain_weights(data_config)
    total = num_shards(data_config)
    shards = list(range(total)) if shards is None else shards
    streams = []
    for shard in shards:
        parts, part_weights = [], []
        for index, name in enumerate(domain_names(data_config)):
            if weights[name] == 0:
                continue
            ds = grain.MapDataset.source(sources[name])[shard::total]
            ds = ds.seed(data_config.seed + 1000 * index).shuffle().repeat().to_iter_dataset()
            parts.append(_packed_rows(ds, data_config, tokenizer, index, shuffle=True))
            part_weights.append(weights[name])
        ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, part_weights)
        streams.append(ds.batch(data_config.batch_size // total, drop_remainder=True))
    if len(streams) == 1:
        return iter(streams[0].map(to_model_batch))
    rows = grain.experimental.ZipIterDataset(streams).map(
        lambda batches: {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    return iter(rows.map(to_model_batch))


def num_shards(data_config) -> int:
    """data.shards, or one per process when 0."""
    import jax

    return data_config.shards or jax.process_count()


def eval_batches(data_config, source, domain_index: int, num_batches: int | None = None, rows=None, *,
                 max_tokens: int | None = None) -> list[dict]:
    """Packed batches of a held-out split, in source order: the same every time.

    Stops after `num_batches` batches, or once the batches score at least `max_tokens` targets
    (loss-mask tokens), or at the end of the split, whichever comes first (None: no limit).
    Batches carry ``document`` ids so that scores can be summed per document. Every process reads
    the same global batches (so all run the same number of eval steps) and keeps `rows` of each
    (the rows its devices hold; None: all).
    """
    tokenizer = make_tokenizer(data_config)
    ds = grain.MapDataset.source(source).map_with_index(lambda i, record: {**record, "document": i})
    ds = _packed_rows(ds.to_iter_dataset(), data_config, tokenizer, domain_index, shuffle=False, documents=True)
    ds = ds.batch(data_config.batch_size, drop_remainder=False).map(to_model_batch)
    batches, scored = [], 0.0
    for batch in ds:
        batch = _pad_rows(batch, data_config.batch_size)
        batches.append(batch if rows is None else {k: v[rows] for k, v in batch.items()})
        scored += float(batch["loss_mask"].sum())
        if len(batches) == num_batches or (max_tokens is not None and scored >= max_tokens):
            break
    return batches


def _pad_rows(batch: dict, rows: int) -> dict:
    """Pads a short final batch with empty rows (segment 0, no loss) to the static batch shape."""
    missing = rows - batch["inputs"].shape[0]
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}

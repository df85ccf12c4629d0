"""Packed rows: documents sharing a row must not see each other, and `to_model_batch` must
mask every target that crosses a document boundary or lands in padding."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btx_jax.data.pipeline import to_model_batch
from btx_jax.models.transformer import Transformer, TransformerConfig

V, T = 64, 16
# one row: documents 1, 2, 3 (per-document positions from 0), then padding (segment 0)
DOCS = {1: slice(0, 5), 2: slice(5, 9), 3: slice(9, 13)}
PAD = slice(13, T)


@functools.lru_cache(maxsize=None)
def model_and_params():
    """A tiny GQA model (built abstractly on one device) with O(1)-scale random float32 params."""
    cfg = TransformerConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, mlp_dim=48)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)

    def leaf(path, x):
        if path[-1].key == "scale":
            value = rng.uniform(0.5, 1.5, size=x.shape)
        elif path[-1].key == "embedding":
            value = rng.normal(size=x.shape)
        else:
            value = rng.normal(size=x.shape) / np.sqrt(32)
        return jnp.asarray(value, x.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state))
    forward = jax.jit(lambda p, tokens, seg, pos: nnx.merge(graphdef, p)(tokens, seg, pos)[0])
    return forward, params


def logits(tokens, seg, pos, rows: int = 5):
    """Logits for a batch, padded with copies of row 0 to a fixed number of rows (one compile)."""
    forward, params = model_and_params()
    n = tokens.shape[0]
    assert n <= rows
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], rows - n, axis=0)])  # noqa: E731
    out = forward(params, jnp.asarray(pad(tokens)), jnp.asarray(pad(seg)), jnp.asarray(pad(pos)))
    return np.asarray(out)[:n]


def packed_row(rng):
    tokens = rng.integers(0, V, size=T).astype(np.int32)
    seg = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    for doc, span in DOCS.items():
        seg[span] = doc
        pos[span] = np.arange(span.stop - span.start)
    return tokens, seg, pos


def fresh_tokens(rng, old):
    """Tokens that differ from `old` at every position."""
    return ((old + rng.integers(1, V, size=old.shape)) % V).astype(np.int32)


def test_documents_in_a_row_are_isolated():
    """Guards the same-segment mask: editing one packed document (or the padding) leaves the
    logits of every other document in the row unchanged, and changes the edited document's own."""
    rng = np.random.default_rng(1)
    tokens, seg, pos = packed_row(rng)
    edits = {**DOCS, 0: PAD}  # segment -> span that gets new tokens
    rows = [tokens]
    for span in edits.values():
        edited = tokens.copy()
        edited[span] = fresh_tokens(rng, tokens[span])
        rows.append(edited)
    out = logits(np.stack(rows), np.stack([seg] * len(rows)), np.stack([pos] * len(rows)))
    base = out[0]
    assert np.abs(base).max() > 1.0  # non-trivial logits
    worst_other = 0.0
    for row, (segment, span) in enumerate(edits.items(), start=1):
        others = seg != segment
        diff_other = np.abs(out[row][others] - base[others]).max()
        worst_other = max(worst_other, float(diff_other))
        assert diff_other <= 1e-6, f"editing segment {segment} moved other documents' logits by {diff_other}"
        own_change = np.abs(out[row][span] - base[span]).max(axis=-1)  # per position of the edited span
        assert own_change.min() > 1e-3, f"editing segment {segment} left some of its own logits unchanged"
    print(f"max |logit change| outside the edited document: {worst_other:.3e}")


def test_packed_document_equals_document_alone():
    """Guards per-document positions and masking: a document packed at an offset gets the same
    logits as the same document alone at the start of a row (RoPE positions restart at 0)."""
    rng = np.random.default_rng(2)
    tokens, seg, pos = packed_row(rng)
    rows, segs, poss = [tokens], [seg], [pos]
    for span in DOCS.values():  # each document alone at the start of a row, then padding
        n = span.stop - span.start
        alone = rng.integers(0, V, size=T).astype(np.int32)  # arbitrary padding tokens
        alone[:n] = tokens[span]
        alone_seg = np.zeros(T, np.int32)
        alone_seg[:n] = 1
        alone_pos = np.zeros(T, np.int32)
        alone_pos[:n] = np.arange(n)
        rows.append(alone), segs.append(alone_seg), poss.append(alone_pos)
    out = logits(np.stack(rows), np.stack(segs), np.stack(poss))
    worst = 0.0
    for row, span in enumerate(DOCS.values(), start=1):
        n = span.stop - span.start
        packed, alone = out[0][span], out[row][:n]
        assert np.abs(packed).max() > 1.0
        worst = max(worst, float(np.abs(packed - alone).max()))
        np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    print(f"max |packed - alone| = {worst:.3e}")

    # controls, so that the equality above is meaningful: without the segment mask (one long
    # document) document 2 reads documents before it; with its positions permuted it changes too.
    # (Shifting all of a document's positions by a constant would NOT change it: RoPE is relative.)
    merged = logits(tokens[None], np.ones_like(seg)[None], np.arange(T, dtype=np.int32)[None])[0]
    assert np.abs(merged[DOCS[2]] - out[0][DOCS[2]]).max() > 1e-3
    permuted = pos.copy()
    permuted[DOCS[2]] = permuted[DOCS[2]][::-1]
    moved = logits(tokens[None], seg[None], permuted[None])[0]
    assert np.abs(moved[DOCS[2]] - out[0][DOCS[2]]).max() > 1e-3
    np.testing.assert_allclose(moved[DOCS[1]], out[0][DOCS[1]], atol=1e-6)


def test_to_model_batch_shifts_and_masks():
    """Guards the input/target shift and the loss mask: a target counts only if it continues the
    same nonzero segment as its input token (no cross-document or into-padding predictions)."""
    tokens = np.arange(27, dtype=np.int64).reshape(3, 9) + 100
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 0, 0],   # three documents then padding
                    [1, 1, 1, 1, 1, 1, 1, 1, 1],   # one document filling the row
                    [1, 2, 2, 2, 2, 2, 0, 0, 0]])  # a one-token document, a second, padding
    pos = np.array([[0, 1, 2, 0, 1, 0, 1, 0, 0],
                    [0, 1, 2, 3, 4, 5, 6, 7, 8],
                    [0, 0, 1, 2, 3, 4, 0, 0, 0]])
    domain = np.array([[2] * 9, [0] * 9, [5] * 9])
    batch = to_model_batch({"tokens": tokens, "tokens_segment_ids": seg, "tokens_positions": pos,
                            "domain": domain})

    expected_mask = np.array([[1, 1, 0, 1, 0, 1, 0, 0],
                              [1, 1, 1, 1, 1, 1, 1, 1],
                              [0, 1, 1, 1, 1, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(batch["inputs"], tokens[:, :8])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # targets are shifted inputs
    np.testing.assert_array_equal(batch["segment_ids"], seg[:, :8])
    np.testing.assert_array_equal(batch["positions"], pos[:, :8])
    np.testing.assert_array_equal(batch["loss_mask"], expected_mask)
    np.testing.assert_array_equal(batch["domain"], [2, 0, 5])
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[key].dtype == np.int32 and batch[key].shape == (3, 8), key
    assert batch["loss_mask"].dtype == np.float32 and batch["domain"].dtype == np.int32
    assert batch["domain"].shape == (3,)
    assert batch["loss_mask"].sum() == 16

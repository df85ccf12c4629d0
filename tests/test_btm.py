"""The BTM ensemble: domain posterior, ensemble probabilities and the prior EMA against a hand computation."""
import numpy as np
import pytest

from btx_jax import btm


def toy():
    """Two experts; expert A gives every target p=0.5, B p=0.25; two documents, then padding."""
    logp = np.log(np.array([[[0.5] * 7], [[0.25] * 7]]))  # [J=2, B=1, T=7]
    batch = {"segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0]]), "loss_mask": np.array([[1, 1, 1, 1, 1, 1, 0]], float)}
    return logp, batch


def test_posterior_and_ensemble_match_hand_computation():
    logp, batch = toy()
    ensemble = btm.PosteriorEnsemble(2, prior_momentum=0.9)
    got = np.exp(ensemble(logp, batch))[0, :6]
    # weight on A: prior 1/2, then Bayes over the document's earlier targets: 2/3, 4/5, 8/9; restart at doc 2
    w_a = np.array([1 / 2, 2 / 3, 4 / 5, 8 / 9, 1 / 2, 2 / 3])
    np.testing.assert_allclose(got, w_a * 0.5 + (1 - w_a) * 0.25, rtol=1e-12)
    # prior EMA: posteriors after each whole document: A 16/17 (4 targets), 4/5 (2 targets)
    mean_a = (16 / 17 + 4 / 5) / 2
    np.testing.assert_allclose(ensemble.prior, [0.9 * 0.5 + 0.1 * mean_a, 0.9 * 0.5 + 0.1 * (1 - mean_a)], rtol=1e-12)


def test_prior_is_used_at_document_start():
    logp, batch = toy()
    post = btm.log_posterior(logp, batch["segment_ids"], batch["loss_mask"], np.log([0.2, 0.8]))
    np.testing.assert_allclose(np.exp(post[:, 0, 0]), [0.2, 0.8], rtol=1e-12)
    np.testing.assert_allclose(np.exp(post[:, 0, 4]), [0.2, 0.8], rtol=1e-12)  # document 2 starts afresh
    np.testing.assert_allclose(np.exp(post[0, 0, 1]), 0.2 * 0.5 / (0.2 * 0.5 + 0.8 * 0.25), rtol=1e-12)


def test_average_params():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    np.testing.assert_allclose(btm.average_params([a, b])["w"], [2.0, 4.0])
    np.testing.assert_allclose(btm.average_params([a, b], [3, 1])["w"], [1.5, 3.0])
    assert btm.average_params([a, b])["w"].dtype == np.float32


def test_top1_routes_each_position_to_the_most_probable_domain():
    """Sample-level routing: the expert with the highest posterior so far; here B is better, the prior favours A."""
    logp = np.log(np.array([[[0.2] * 4], [[0.6] * 4]]))
    batch = {"segment_ids": np.ones((1, 4), int), "loss_mask": np.ones((1, 4))}
    ensemble = btm.PosteriorEnsemble(2, top1=True)
    ensemble.log_prior = np.log([0.9, 0.1])
    got = np.exp(ensemble(logp, batch))[0]
    # posterior on B: 0.1, then 0.1*0.6 / (0.1*0.6 + 0.9*0.2) = 0.25, then 0.5, then 0.75
    np.testing.assert_allclose(got, [0.2, 0.2, 0.2, 0.6], rtol=1e-12)


# ----------------------------------------------------------------- batches from the real pipeline

def pipeline_batch(texts, seq_len=32, batch_size=2):
    """One eval batch as the pipeline packs it: several documents a row, then padding."""
    from btx_jax.config import base_config
    from btx_jax.data import pipeline

    c = base_config()
    c.data.update(seq_len=seq_len, batch_size=batch_size)
    (batch,) = pipeline.eval_batches(c.data, [{"text": t.encode()} for t in texts], 0, 1)
    return batch


def test_document_ends_on_a_packed_batch():
    """Each whole document ends at its last scored target; the pipeline never scores the position after it."""
    docs = ["one", "two two", "three three three", "four"]
    batch = pipeline_batch(docs)
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    assert np.any(seg == 0), "the batch should hold padding"
    assert max(len(np.unique(s[s > 0])) for s in seg) >= 2, "a row should hold several documents"
    ends = btm.document_ends(seg, mask)
    assert ends.sum() == len(docs)
    for row, col in zip(*np.nonzero(ends)):
        assert mask[row, col] == 1 and (col + 1 == seg.shape[1] or mask[row, col + 1] == 0)
    # per document: scored targets = bytes + EOS, and the end is the last of them
    assert mask.sum() == sum(len(d) + 1 for d in docs)


def test_prior_moves_after_a_batch_of_whole_documents():
    """Expert 0 predicts every target better: after one batch the prior must move towards it, by the
    EMA of the documents' posteriors (hand computation on the pipeline's own batch)."""
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    batch = pipeline_batch(docs)
    shape = batch["loss_mask"].shape
    logp = np.stack([np.full(shape, np.log(0.5)), np.full(shape, np.log(0.25))])
    ensemble = btm.PosteriorEnsemble(2, prior_momentum=0.9)
    ensemble(logp, batch)
    # a document of n scored targets ends with posterior 2^n / (2^n + 1) on expert 0
    n = [len(d) + 1 for d in docs]
    mean_a = np.mean([2.0 ** k / (2.0 ** k + 1) for k in n])
    np.testing.assert_allclose(ensemble.prior, [0.9 * 0.5 + 0.1 * mean_a, 0.9 * 0.5 + 0.1 * (1 - mean_a)], rtol=1e-9)


def test_fit_prior_is_the_mean_document_posterior():
    docs = ["aaaa", "bb"]
    batch = pipeline_batch(docs)
    shape = batch["loss_mask"].shape
    logp = np.stack([np.full(shape, np.log(0.2)), np.full(shape, np.log(0.4))])
    got = btm.fit_prior([(logp, batch)], 2)
    post_b = [2.0 ** (len(d) + 1) / (2.0 ** (len(d) + 1) + 1) for d in docs]
    np.testing.assert_allclose(got, [1 - np.mean(post_b), np.mean(post_b)], rtol=1e-9)
    with pytest.raises(ValueError, match="no complete document"):
        btm.fit_prior([], 2)

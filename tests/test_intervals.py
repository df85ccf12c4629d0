"""Paired-bootstrap intervals and per-document scores: hand-checkable cases, no training."""
import numpy as np
import pytest

from btx_jax import intervals
from btx_jax.evaluate import DomainScores, per_document


def scores(nll, tokens):
    return DomainScores(np.asarray(nll, float), np.asarray(tokens, float))


def test_per_document_sums_scored_tokens_by_document():
    batch = {"document": np.array([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 0, 0]]),
             "loss_mask": np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]], float)}
    nll = np.arange(12, dtype=float).reshape(2, 6) * batch["loss_mask"]
    got = per_document([nll], [batch])
    np.testing.assert_allclose(got.nll, [0 + 1, 3, 6 + 7 + 8])
    np.testing.assert_allclose(got.tokens, [2, 1, 3])
    assert got.loss == pytest.approx(nll.sum() / 6)


def test_document_split_over_two_batches_is_one_document():
    a = {"document": np.array([[5, 5]]), "loss_mask": np.ones((1, 2))}
    b = {"document": np.array([[5, 6]]), "loss_mask": np.ones((1, 2))}
    got = per_document([np.ones((1, 2)), 2 * np.ones((1, 2))], [a, b])
    np.testing.assert_allclose(got.nll, [1 + 1 + 2, 2])
    np.testing.assert_allclose(got.tokens, [3, 1])


def test_identical_documents_give_a_zero_width_interval():
    reps = intervals.replicates({"m": [{"d": scores([2.0] * 50, [1] * 50)}]}, ["d"], ["d"], num=200)
    low, high = intervals.interval(reps["m"]["d"])
    assert low == pytest.approx(np.exp(2.0)) and high == pytest.approx(np.exp(2.0))


def test_interval_covers_the_point_and_shrinks_with_more_documents():
    rng = np.random.default_rng(0)
    nll = rng.gamma(4.0, 0.5, size=200) * 10
    tokens = np.full(200, 10.0)
    small = intervals.replicates({"m": [{"d": scores(nll, tokens)}]}, ["d"], ["d"], num=2000)["m"]["d"]
    big = intervals.replicates({"m": [{"d": scores(np.tile(nll, 16), np.tile(tokens, 16))}]}, ["d"], ["d"],
                               num=2000)["m"]["d"]
    point = np.exp(nll.sum() / tokens.sum())
    for reps in (small, big):
        low, high = intervals.interval(reps)
        assert low < point < high
    width = lambda r: np.subtract(*intervals.interval(r)[::-1])  # noqa: E731
    assert width(big) == pytest.approx(width(small) / 4, rel=0.25)  # 16x the documents: 1/sqrt(16)


def test_paired_bootstrap_finds_a_small_consistent_win():
    """B is 1% better than A on every document: the unpaired intervals overlap, the paired test decides."""
    rng = np.random.default_rng(1)
    nll_a = rng.gamma(2.0, 1.0, size=100) * 20
    a = [{"d": scores(nll_a, [20] * 100)}]
    b = [{"d": scores(nll_a * 0.99, [20] * 100)}]
    reps = intervals.replicates({"A": a, "B": b}, ["d"], ["d"], num=1000)
    low_a, high_a = intervals.interval(reps["A"]["d"])
    low_b, high_b = intervals.interval(reps["B"]["d"])
    assert low_a < high_b  # overlapping intervals
    assert intervals.best(reps, "d") == "B"


def test_no_best_when_models_tie_or_trade_places():
    rng = np.random.default_rng(2)
    nll = rng.gamma(2.0, 1.0, size=100) * 20
    noise = rng.normal(0, 2.0, size=100)
    reps = intervals.replicates({"A": [{"d": scores(nll, [20] * 100)}], "B": [{"d": scores(nll + noise, [20] * 100)}]},
                                ["d"], ["d"], num=1000)
    assert intervals.best(reps, "d") is None
    same = intervals.replicates({"A": [{"d": scores(nll, [20] * 100)}], "B": [{"d": scores(nll, [20] * 100)}]},
                                ["d"], ["d"], num=200)
    assert intervals.best(same, "d") is None


def test_seed_variation_widens_the_interval():
    """Two trials that disagree by far more than the document noise: the interval spans both."""
    docs = np.full(100, 10.0)
    one = scores(docs * 2.0, docs)
    other = scores(docs * 2.2, docs)
    reps = intervals.replicates({"m": [{"d": one}, {"d": other}]}, ["d"], ["d"], num=2000)
    low, high = intervals.interval(reps["m"]["d"])
    assert low == pytest.approx(np.exp(2.0)) and high == pytest.approx(np.exp(2.2))
    assert intervals.point([{"d": one}, {"d": other}], "d") == pytest.approx((np.exp(2.0) + np.exp(2.2)) / 2)


def test_average_column_and_mismatched_inputs():
    a = [{"x": scores([1.0] * 10, [1] * 10), "y": scores([3.0] * 10, [1] * 10)}]
    reps = intervals.replicates({"m": a}, ["x", "y"], ["x", "y"], num=100)
    np.testing.assert_allclose(reps["m"]["avg"], (np.e + np.e ** 3) / 2)
    with pytest.raises(ValueError, match="different documents"):
        intervals.replicates({"m": a, "n": [{"x": scores([1.0] * 9, [1] * 9), "y": a[0]["y"]}]}, ["x", "y"], ["x"])
    with pytest.raises(ValueError, match="same number of trials"):
        intervals.replicates({"m": a, "n": a * 2}, ["x"], ["x"])

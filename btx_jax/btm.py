"""Branch-Train-Merge baselines: the dense domain experts as a posterior-weighted ensemble, or averaged.

Ensemble (BTM): the next-token distribution is sum_j P(j | context) p_j(x_t | x_<t), where the
domain posterior follows Bayes' rule over the tokens of the same document seen so far,
P(j | x_<t) ∝ P(j) prod_{s<t} p_j(x_s | x_<s), and the prior P(j) is an exponential moving
average of the posteriors at the end of the held-out documents evaluated before.

Everything here works on per-token log-probabilities, so it is plain numpy and can be checked
by hand; the recipe gets them from its scorer (``btx_jax/evaluate.py``).
"""
from __future__ import annotations

import jax
import numpy as np


def context_log_likelihood(logp: np.ndarray, segment_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sum of log p_j over the earlier targets of the same document: [J, B, T] (exclusive prefix sums)."""
    masked = np.where(mask[None] > 0, logp, 0.0).astype(np.float64)
    total = np.cumsum(masked, axis=-1)
    before = total - masked  # exclusive
    # restart at every document boundary: subtract the running total at the document's first position
    starts = np.concatenate([np.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    index = np.maximum.accumulate(np.where(starts, np.arange(segment_ids.shape[1])[None], 0), axis=1)
    offset = np.take_along_axis(before, np.broadcast_to(index[None], before.shape), axis=-1)
    return before - offset


def log_posterior(logp, segment_ids, mask, log_prior) -> np.ndarray:
    """log P(j | context) for every target position [J, B, T]."""
    scores = context_log_likelihood(logp, segment_ids, mask) + np.asarray(log_prior, np.float64)[:, None, None]
    return scores - np.logaddexp.reduce(scores, axis=0, keepdims=True)


def ensemble_logprob(logp, log_post, top1: bool = False) -> np.ndarray:
    """log sum_j P(j | context) p_j(target) [B, T]; `top1`: only the most probable domain's expert
    (sample-level routing: each document goes to one expert, chosen by the posterior so far)."""
    if top1:
        best = np.argmax(log_post, axis=0)[None]
        return np.take_along_axis(logp, best, axis=0)[0]
    return np.logaddexp.reduce(log_post + logp, axis=0)


def document_ends(segment_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, T] True at each document's last scored target (the next position is another document,
    unscored, or past the row)."""
    scored = mask > 0
    next_same = np.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & scored[:, 1:],
                                np.zeros_like(scored[:, :1])], axis=1)
    return scored & ~next_same


def document_posteriors(logp, segment_ids, mask, log_prior) -> np.ndarray:
    """P(j | the whole document) for every document that ends in the batch: [J, documents].

    A document ends at its last scored target: the pipeline masks the position whose target
    would start the next document, so "the last position of the segment" is never scored.
    """
    ends = document_ends(segment_ids, mask)
    full = log_posterior(logp, segment_ids, mask, log_prior)
    final = full + np.where(mask[None] > 0, logp, 0.0)  # add the last target to the context
    final = final - np.logaddexp.reduce(final, axis=0, keepdims=True)
    return np.exp(final[:, ends])


def fit_prior(logp_and_batches, num_experts: int) -> np.ndarray:
    """The domain prior for a posterior-weighted average: the mean, over the documents of a
    calibration set (never the evaluation's), of each document's posterior under a uniform prior."""
    uniform = np.full(num_experts, -np.log(num_experts))
    posteriors = [document_posteriors(logp, np.asarray(b["segment_ids"]), np.asarray(b["loss_mask"]), uniform)
                  for logp, b in logp_and_batches]
    posteriors = np.concatenate(posteriors, axis=1) if posteriors else np.zeros((num_experts, 0))
    if posteriors.shape[1] == 0:
        raise ValueError("the calibration set holds no complete document; give it more tokens")
    return posteriors.mean(axis=1)


class PosteriorEnsemble:
    """Runs the BTM ensemble over batches, updating the prior after each one."""

    def __init__(self, num_experts: int, prior_momentum: float = 0.9, top1: bool = False):
        self.log_prior = np.full(num_experts, -np.log(num_experts))
        self.momentum, self.top1 = prior_momentum, top1

    def __call__(self, logp: np.ndarray, batch: dict) -> np.ndarray:
        """logp [J, B, T] of each expert -> the ensemble's log-prob [B, T]; then the prior moves."""
        seg, mask = np.asarray(batch["segment_ids"]), np.asarray(batch["loss_mask"])
        post = log_posterior(logp, seg, mask, self.log_prior)
        out = ensemble_logprob(logp, post, self.top1)
        self.update_prior(logp, seg, mask)
        return out

    def update_prior(self, logp, seg, mask) -> None:
        """EMA of the posterior at the end of each document of the batch (mean over its documents)."""
        final = document_posteriors(logp, seg, mask, self.log_prior)
        if final.shape[1] == 0:
            return
        prior = self.momentum * np.exp(self.log_prior) + (1 - self.momentum) * final.mean(axis=1)
        self.log_prior = np.log(prior / prior.sum())

    @property
    def prior(self) -> np.ndarray:
        return np.exp(self.log_prior)


def average_params(params: list[dict], weights=None) -> dict:
    """Parameter average of dense models of one architecture (uniform, or with the given weights)."""
    weights = np.full(len(params), 1.0 / len(params)) if weights is None else np.asarray(weights) / np.sum(weights)
    return jax.tree.map(lambda *leaves: sum(w * np.asarray(leaf, np.float32) for w, leaf in zip(weights, leaves))
                        .astype(leaves[0].dtype), *params)

"""Uncertainty for the recipe's table: a paired bootstrap over eval documents and training seeds.

Each replicate draws the training seeds (trials) with replacement and, per domain, the eval
documents with replacement; a model's replicate perplexity on a domain is the mean over the
drawn trials of exp(sum NLL / sum tokens) over the drawn documents. Every model is scored on
the same documents and trials in a replicate (paired), so the difference between two models
is known far better than either interval alone suggests: a model is called best on a column
only where it beats every other model in at least 97.5% of the replicates.
"""
from __future__ import annotations

import numpy as np

from btx_jax.evaluate import DomainScores

LEVEL = 0.95


def replicates(scores: dict[str, list[dict[str, DomainScores]]], domains: list[str], avg_domains: list[str],
               num: int = 1000, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{model: [trial]{domain: scores}} -> {model: {domain or "avg": [num] replicate perplexities}}.

    Every model must have the same number of trials and the same documents: all rows are paired.
    """
    rng = np.random.default_rng(seed)
    trials = {len(t) for t in scores.values()}
    if len(trials) != 1:
        raise ValueError(f"every model needs the same number of trials, got {sorted(trials)}")
    (num_trials,) = trials
    drawn_trials = rng.integers(0, num_trials, size=(num, num_trials)) if num_trials > 1 else np.zeros((num, 1), int)
    out = {model: {} for model in scores}
    for domain in domains:
        num_docs = {len(t[domain].nll) for per_model in scores.values() for t in per_model}
        if len(num_docs) != 1:
            raise ValueError(f"domain {domain}: models were scored on different documents ({sorted(num_docs)})")
        (n,) = num_docs
        docs = rng.integers(0, n, size=(num, n))
        for model, per_trial in scores.items():
            ppl = np.stack([np.exp(t[domain].nll[docs].sum(1) / np.maximum(t[domain].tokens[docs].sum(1), 1.0))
                            for t in per_trial])  # [trials, num]
            out[model][domain] = np.take_along_axis(ppl.T, drawn_trials, axis=1).mean(1)
    for model in scores:
        out[model]["avg"] = np.mean([out[model][d] for d in avg_domains], axis=0)
    return out


def interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def best(reps: dict[str, dict[str, np.ndarray]], column: str) -> str | None:
    """The model that beats every other one on `column` in >= 97.5% of paired replicates, else None."""
    if len(reps) < 2:
        return next(iter(reps), None)
    means = {m: samples[column].mean() for m, samples in reps.items()}
    leader = min(means, key=means.get)
    wins = min(np.mean(reps[leader][column] < reps[m][column]) for m in reps if m != leader)
    return leader if wins >= 1 - (1 - LEVEL) / 2 else None


def point(scores: list[dict[str, DomainScores]], domain: str) -> float:
    """The reported perplexity: the mean over trials of the full-data perplexity."""
    return float(np.mean([t[domain].ppl for t in scores]))


def paired_deltas(scores: dict[str, list[dict[str, DomainScores]]], reference: str, domains: list[str],
                  num: int = 1000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """Every other model against `reference`, all scored on the same documents and trials:
    {model: {domain: {"ppl", "delta", "interval"}}}, delta = its perplexity minus the reference's (point
    estimates as :func:`point`), interval = the 95% interval of that difference over paired replicates.

    The difference is what is asked (what does removing an expert cost?), and pairing makes it far
    tighter than the two perplexities' own intervals: the documents that are hard for one are hard
    for both. A model identical to the reference gets delta 0 and the interval (0, 0)."""
    reps = replicates(scores, domains, domains, num=num, seed=seed)
    base = {d: point(scores[reference], d) for d in domains}
    return {model: {d: {"ppl": point(per_trial, d), "delta": point(per_trial, d) - base[d],
                        "interval": interval(reps[model][d] - reps[reference][d])} for d in domains}
            for model, per_trial in scores.items() if model != reference}

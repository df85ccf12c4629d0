"""Held-out evaluation, shared by training and the recipe: per-domain perplexity from per-document scores.

An evaluation scores a fixed, deterministic prefix of each domain's held-out split (a number of
batches in training, a token budget or the whole split in the recipe) and keeps the negative
log-likelihood summed per document, so that every perplexity can be given a bootstrap interval
over documents (``btx_jax/intervals.py``). MoE models also report, per domain, where the router
sent the tokens and what fraction of the routing choices the capacity dropped.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from btx_jax import steps
from btx_jax.data import pipeline


@dataclasses.dataclass
class DomainScores:
    """One model on one domain: summed NLL and scored targets per document (aligned across models)."""

    nll: np.ndarray     # [N] float64
    tokens: np.ndarray  # [N] float64

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / max(self.tokens.sum(), 1.0))

    @property
    def ppl(self) -> float:
        return float(np.exp(self.loss))


def load_eval_sets(config, *, num_batches: int | None = None, max_tokens: int | None = None,
                   split: str = "eval", names=None, rows=None) -> dict[str, list[dict]]:
    """Per-domain held-out batches (training and ``data.eval_domains``), read once.

    Default: ``train.eval_batches`` batches per domain (a training run's progress check).
    ``max_tokens``: batches until at least that many targets are scored (0: the whole split).
    ``rows``: the rows of each global batch that this process's devices hold (None: all).
    """
    every = pipeline.domain_names(config.data) + sorted(config.data.eval_domains.keys())
    names = every if names is None else names
    if max_tokens is None and num_batches is None:
        num_batches = config.train.eval_batches
    sources = pipeline.open_sources(config.data, split, names)
    return {name: pipeline.eval_batches(config.data, src, every.index(name), num_batches, rows,
                                        max_tokens=max_tokens or None)
            for name, src in sources.items()}


def scored_tokens(batches: list[dict]) -> int:
    return int(sum(float(b["loss_mask"].sum()) for b in batches))


def evaluate(eval_step, params, eval_sets: dict, batch_shardings) -> dict:
    """eval/<domain>/{loss,ppl} and their averages over domains (a training run's eval)."""
    out = {}
    for name, batches in eval_sets.items():
        nll, count = 0.0, 0.0
        for batch in batches:
            s, c = eval_step(params, steps.to_global(batch, batch_shardings))
            nll, count = nll + float(s), count + float(c)
        loss = nll / max(count, 1.0)
        out[f"eval/{name}/loss"], out[f"eval/{name}/ppl"] = loss, float(np.exp(loss))
    out["eval/avg_loss"] = float(np.mean([v for k, v in out.items() if k.endswith("/loss")]))
    out["eval/avg_ppl"] = float(np.mean([v for k, v in out.items() if k.endswith("/ppl")]))
    return out


# ------------------------------------------------------------------------------- per document

def per_document(token_values: list[np.ndarray], batches: list[dict]) -> DomainScores:
    """Sums [B, T] per-token values (already zero where the loss mask is 0) per document.

    Documents are numbered by their index in the split, so two models scored on the same
    batches get aligned arrays (what a paired bootstrap needs).
    """
    ids, values, counts = [], [], []
    for v, batch in zip(token_values, batches):
        scored = batch["loss_mask"] > 0
        ids.append(batch["document"][scored])
        values.append(np.asarray(v, np.float64)[scored])
        counts.append(np.ones(int(scored.sum())))
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    docs, index = np.unique(ids, return_inverse=True)
    return DomainScores(np.bincount(index, np.concatenate(values) if values else None, len(docs)),
                        np.bincount(index, np.concatenate(counts) if counts else None, len(docs)))


def make_token_scorer(setup):
    """A jitted (params, batch[, router_bias[, expert_keep]]) -> (masked token NLL [B, T], MoE aux) for any model
    of `setup` (`router_bias`: a bias-balanced MoE's selection bias, part of its routing; `expert_keep` [E]
    bool: experts masked by an input, so every mask is scored by one compiled program)."""
    def score(params, batch, router_bias=None, expert_keep=None):
        logits, aux = steps.forward(setup.graphdef, params, batch, router_bias=router_bias, expert_keep=expert_keep)
        nll, _ = steps.token_nll(logits, batch["targets"])
        routing = {k: aux[k] for k in ("expert_usage", "dropped_fraction") if k in aux}
        return nll * batch["loss_mask"], routing
    return steps._under_mesh(jax.jit(score), setup.mesh)


def token_nll(scorer, params, eval_sets: dict, batch_shardings) -> tuple[dict, dict]:
    """-> ({domain: [masked token NLL [B, T] per batch]}, {domain: {"expert_usage": [L, E], "dropped_fraction"}}).

    Routing statistics are token-weighted means over the domain's batches (MoE models only).
    """
    nll, routing = {}, {}
    for domain, batches in eval_sets.items():
        values, stats, weights = [], [], []
        for batch in batches:
            token_values, aux = scorer(params, steps.to_global(batch, batch_shardings))
            values.append(np.asarray(token_values))
            stats.append(jax.device_get(aux))
            weights.append(float(batch["loss_mask"].sum()))
        nll[domain] = values
        if stats and stats[0]:
            w = np.asarray(weights) / max(sum(weights), 1.0)
            routing[domain] = {
                "expert_usage": np.tensordot(w, np.stack([s["expert_usage"] for s in stats]), 1).tolist(),
                "dropped_fraction": float(np.dot(w, [np.mean(s["dropped_fraction"]) for s in stats]))}
    return nll, routing


def score_model(scorer, params, eval_sets: dict, batch_shardings) -> tuple[dict, dict]:
    """-> ({domain: DomainScores}, routing statistics as in `token_nll`)."""
    nll, routing = token_nll(scorer, params, eval_sets, batch_shardings)
    return {domain: per_document(nll[domain], batches) for domain, batches in eval_sets.items()}, routing

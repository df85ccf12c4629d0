"""Scores every model of a finished recipe trial on the same held-out documents.

Dense and MoE models are scored directly (MoE models with the dropless dispatcher, so that
evaluation never drops a token). The BTM rows are built from the branches here:
  - ensemble: the branches weighted by the domain posterior (Bayes over the document so far,
    prior an EMA over the evaluation's earlier documents, as in BTM);
  - sample-level routing: the most probable branch only;
  - uniform parameter average;
  - posterior-weighted parameter average, whose per-domain weights are fitted on a
    calibration set drawn from the *training* split (never on the documents it is scored on).
"""
from __future__ import annotations

import json

import jax
import numpy as np

from btx_jax import btm, checkpoint, sharding, steps
from btx_jax.evaluate import DomainScores, make_token_scorer, per_document, score_model
from btx_jax.metrics import read_metrics
from btx_jax.state import make_setup


class Scorer:
    """One compiled scorer per model shape (setups and jitted functions are reused across models)."""

    def __init__(self):
        self._cache = {}

    def setup(self, c):
        key = json.dumps({k: c[k].to_dict() for k in ("model", "moe", "mesh")}, sort_keys=True)
        if key not in self._cache:
            mesh = sharding.make_mesh(c.mesh)
            setup = make_setup(c, mesh)
            self._cache[key] = (setup, make_token_scorer(setup), btm.token_logprobs(setup.graphdef, mesh))
        return self._cache[key]


def train_drop_fraction(workdir: str) -> float | None:
    """Mean over the logged training steps (and MoE layers) of the fraction of routing choices dropped."""
    values = [np.mean(m["moe/dropped_fraction"]) for m in read_metrics(workdir) if "moe/dropped_fraction" in m]
    return float(np.mean(values)) if values else None


def score_trial(recipe, eval_sets: dict, calibration_sets: dict, with_btm: bool, scorer: Scorer | None = None,
                out=print) -> dict[str, dict]:
    """{model name: {"scores": {domain: DomainScores}, "routing": ..., "drop": ..., "compute": [stages]}}."""
    scorer = scorer or Scorer()
    rows = {}
    for model in recipe.models():
        setup, score_fn, _ = scorer.setup(model["config"])
        params = checkpoint.load_params(recipe.path(model["stage"]), setup.abstract_params)
        scores, routing = score_model(score_fn, params, eval_sets, steps.batch_shardings(setup.mesh))
        drop = None
        if model["config"].moe.num_experts:
            drop = {"train": train_drop_fraction(recipe.path(model["stage"])),
                    "eval": float(np.mean([r["dropped_fraction"] for r in routing.values()]))}
        rows[model["name"]] = {"scores": scores, "routing": routing, "drop": drop, "compute": model["compute"]}
        out(f"[recipe] eval: {model['name']}: " + ", ".join(f"{d} {s.ppl:.3f}" for d, s in scores.items()))
    if with_btm:
        rows.update(btm_rows(recipe, eval_sets, calibration_sets, scorer, out))
    return rows


def btm_rows(recipe, eval_sets: dict, calibration_sets: dict, scorer: Scorer, out=print) -> dict[str, dict]:
    from btx_jax.recipe import dense_config
    branch_stages = [f"branch/{d}" for d in recipe.domains]
    setup, score_fn, logprob = scorer.setup(dense_config(recipe.config, 1))
    shardings = steps.batch_shardings(setup.mesh)
    branch_params = [checkpoint.load_params(recipe.path(s), setup.abstract_params) for s in branch_stages]

    def branch_logp(batch):
        batch = steps.to_global(batch, shardings)
        return np.stack([np.asarray(logprob(p, batch)) for p in branch_params])  # [J, B, T]

    ensemble, top1, priors = {}, {}, {}
    for domain, batches in eval_sets.items():
        posterior = btm.PosteriorEnsemble(len(branch_params))
        routed = btm.PosteriorEnsemble(len(branch_params), top1=True)
        nll_ens, nll_top1 = [], []
        for batch in batches:
            logp = branch_logp(batch)
            nll_ens.append(-posterior(logp, batch) * batch["loss_mask"])
            nll_top1.append(-routed(logp, batch) * batch["loss_mask"])
        ensemble[domain] = per_document(nll_ens, batches)
        top1[domain] = per_document(nll_top1, batches)
        priors[domain] = (btm.fit_prior(((branch_logp(b), b) for b in calibration_sets[domain]), len(branch_params))
                          if domain in calibration_sets else np.full(len(branch_params), 1.0 / len(branch_params)))
    compute = ["seed", *branch_stages]
    rows = {"BTM ensemble": {"scores": ensemble, "compute": compute},
            "sample-level routing (top-1 expert)": {"scores": top1, "compute": compute}}
    host_params = [jax.device_get(p) for p in branch_params]
    target = jax.tree.map(lambda a: a.sharding, setup.abstract_params)
    uniform = jax.device_put(btm.average_params(host_params), target)
    rows["BTM uniform average"] = {"scores": score_model(score_fn, uniform, eval_sets, shardings)[0],
                                   "compute": compute}
    weighted: dict[str, DomainScores] = {}
    for domain, batches in eval_sets.items():  # each domain: the average weighted by its calibrated prior
        average = jax.device_put(btm.average_params(host_params, priors[domain]), target)
        weighted.update(score_model(score_fn, average, {domain: batches}, shardings)[0])
    rows["BTM posterior average"] = {"scores": weighted, "compute": compute,
                                     "priors": {d: p.tolist() for d, p in priors.items()}}
    for name in rows:
        out(f"[recipe] eval: {name}: " + ", ".join(f"{d} {s.ppl:.3f}" for d, s in rows[name]["scores"].items()))
    return rows

"""Scores every model of a finished recipe trial on the same held-out documents.

Dense and MoE models are scored directly (MoE models with the dropless dispatcher, so that
evaluation never drops a token). The BTM rows are built from the branches here:
  - ensemble: the branches weighted by the domain posterior (Bayes over the document so far,
    prior an EMA over the evaluation's earlier documents, as in BTM);
  - sample-level routing: the most probable branch only;
  - uniform parameter average;
  - posterior-weighted parameter average, whose per-domain weights are fitted on a
    calibration set drawn from the *training* split (never on the documents it is scored on).

With ``recipe.opt_out`` the BTX model is also scored with each expert masked in turn
(``moe.masked_experts``, FlexOlmo's opt-out: what each data owner's expert is worth, per domain).
MoE models are scored with the mask as an input of the scorer (all True for the models as trained),
so BTX and all its opt-out rows run one compiled program.
"""
from __future__ import annotations

import copy
import json

import jax
import numpy as np

from btx_jax import btm, checkpoint, sharding, steps
from btx_jax.evaluate import DomainScores, make_token_scorer, per_document, score_model, token_nll
from btx_jax.metrics import read_metrics
from btx_jax.models.moe import masked_indices
from btx_jax.models.router import kept_experts
from btx_jax.state import make_setup, saved_router_bias


class Scorer:
    """One compiled scorer per model shape (setups and jitted functions are reused across models)."""

    def __init__(self):
        self._cache = {}

    def setup(self, c):
        key = json.dumps({k: c[k].to_dict() for k in ("model", "moe", "mesh")}, sort_keys=True)
        if key not in self._cache:
            mesh = sharding.make_mesh(c.mesh)
            setup = make_setup(c, mesh)
            self._cache[key] = (setup, make_token_scorer(setup))
        return self._cache[key]


def train_drop_fraction(workdir: str) -> float | None:
    """Mean over the logged training steps (and MoE layers) of the fraction of routing choices dropped."""
    values = [np.mean(m["moe/dropped_fraction"]) for m in read_metrics(workdir) if "moe/dropped_fraction" in m]
    return float(np.mean(values)) if values else None


def score_trial(recipe, eval_sets: dict, calibration_sets: dict, with_btm: bool, scorer: Scorer | None = None,
                out=print) -> dict[str, dict]:
    """{model name: {"scores": {domain: DomainScores}, "routing": ..., "drop": ..., "compute": [stages]}}."""
    scorer = scorer or Scorer()
    rows, branch_nll = {}, {}
    for model in recipe.models():
        setup, score_fn = scorer.setup(model["config"])
        params = checkpoint.load_params(recipe.path(model["stage"]), setup.abstract_params)
        num_experts = model["config"].moe.num_experts
        bias = saved_router_bias(recipe.path(model["stage"]), setup.mesh) if num_experts else None
        keep = np.ones(num_experts, bool) if num_experts else None  # nothing masked beyond its config's mask
        shardings = steps.batch_shardings(setup.mesh)
        nll, routing = token_nll(steps.with_router_bias(score_fn, bias, keep), params, eval_sets, shardings)
        scores = {domain: per_document(nll[domain], batches) for domain, batches in eval_sets.items()}
        if model["stage"].startswith("branch/"):
            branch_nll[model["stage"]] = nll  # the BTM rows are built from these, not recomputed
        drop = None
        if model["config"].moe.num_experts:
            drop = {"train": train_drop_fraction(recipe.path(model["stage"])),
                    "eval": float(np.mean([r["dropped_fraction"] for r in routing.values()]))}
        rows[model["name"]] = {"scores": scores, "routing": routing, "drop": drop, "compute": model["compute"]}
        out(f"[recipe] eval: {model['name']}: " + ", ".join(f"{d} {s.ppl:.3f}" for d, s in scores.items()))
    if recipe.config.recipe.get("opt_out", False):
        rows["BTX"]["opt_out"] = opt_out_scores(recipe, eval_sets, scorer, out=out)
    if with_btm:
        rows.update(btm_rows(recipe, eval_sets, calibration_sets, scorer, branch_nll, out=out))
    return rows


def score_masked(recipe, model: dict, masked: str, eval_sets: dict, scorer: Scorer, params=None) -> dict:
    """{domain: DomainScores} of an MoE model of `recipe.models()` with ``moe.masked_experts=masked``
    ("": the model as trained); `params`: its params, already loaded (the masked model's are the same).
    The mask is an input of the scorer (see :func:`btx_jax.models.router.route`), not a config: every mask
    runs the program of the model without one."""
    c = copy.deepcopy(model["config"])
    c.moe.masked_experts = ""
    setup, score_fn = scorer.setup(c)
    if params is None:
        params = checkpoint.load_params(recipe.path(model["stage"]), setup.abstract_params)
    bias = saved_router_bias(recipe.path(model["stage"]), setup.mesh)
    keep = kept_experts(c.moe.num_experts, masked_indices(masked))
    return score_model(steps.with_router_bias(score_fn, bias, keep), params, eval_sets,
                       steps.batch_shardings(setup.mesh))[0]


def opt_out_scores(recipe, eval_sets: dict, scorer: Scorer, out=print) -> dict[str, dict]:
    """{expert label: {domain: DomainScores}}: BTX with that one expert masked (never routed to), for every
    expert; labels from ``recipe.expert_labels()`` (expert i = sorted domain i, the seed's FFN last)."""
    btx = next(m for m in recipe.models() if m["name"] == "BTX")
    setup, _ = scorer.setup(btx["config"])
    params = checkpoint.load_params(recipe.path(btx["stage"]), setup.abstract_params)
    already = masked_indices(btx["config"].moe.masked_experts)  # masked by the config itself: stay masked
    rows = {}
    for index, label in enumerate(recipe.expert_labels()):
        if index in already:
            continue
        masked = ",".join(str(i) for i in sorted({*already, index}))
        rows[label] = score_masked(recipe, btx, masked, eval_sets, scorer, params)
        out(f"[recipe] eval: BTX without expert {index} ({label}): "
            + ", ".join(f"{d} {s.ppl:.3f}" for d, s in rows[label].items()))
    return rows


def btm_rows(recipe, eval_sets: dict, calibration_sets: dict, scorer: Scorer, branch_nll: dict | None = None,
             out=print) -> dict[str, dict]:
    """The BTM rows from the branches' token NLL on the eval sets (`branch_nll`: {stage: {domain: [B, T]
    arrays]}, as `score_trial` computed them for the expert rows; computed here when not given)."""
    from btx_jax.recipe import dense_config
    branch_stages = [f"branch/{d}" for d in recipe.domains]
    setup, score_fn = scorer.setup(dense_config(recipe.config, 1))
    shardings = steps.batch_shardings(setup.mesh)
    branch_params = [checkpoint.load_params(recipe.path(s), setup.abstract_params) for s in branch_stages]
    if branch_nll is None:
        branch_nll = {s: token_nll(score_fn, p, eval_sets, shardings)[0] for s, p in zip(branch_stages, branch_params)}
    calibration_nll = [token_nll(score_fn, p, calibration_sets, shardings)[0] for p in branch_params]
    num = len(branch_params)

    def logp(per_branch: list[dict], domain: str, i: int) -> np.ndarray:
        """[J, B, T] log p(target) of each branch on batch i (0 where the loss mask is 0)."""
        return -np.stack([nll[domain][i] for nll in per_branch])

    per_branch = [branch_nll[s] for s in branch_stages]
    ensemble, top1, priors = {}, {}, {}
    for domain, batches in eval_sets.items():
        posterior, routed = btm.PosteriorEnsemble(num), btm.PosteriorEnsemble(num, top1=True)
        nll_ens, nll_top1 = [], []
        for i, batch in enumerate(batches):
            nll_ens.append(-posterior(logp(per_branch, domain, i), batch) * batch["loss_mask"])
            nll_top1.append(-routed(logp(per_branch, domain, i), batch) * batch["loss_mask"])
        ensemble[domain] = per_document(nll_ens, batches)
        top1[domain] = per_document(nll_top1, batches)
        priors[domain] = (btm.fit_prior(((logp(calibration_nll, domain, i), b)
                                         for i, b in enumerate(calibration_sets[domain])), num)
                          if domain in calibration_sets else np.full(num, 1.0 / num))
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

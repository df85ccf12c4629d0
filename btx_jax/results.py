"""The recipe's comparison summarised: point estimates and paired-bootstrap intervals per model and
domain, compute per model, BTM's calibration sets, and every per-document score saved for later."""
from __future__ import annotations

import numpy as np
from etils import epath

from btx_jax import evaluate, intervals
from btx_jax.data.datasets import DataError


def calibration_sets(config, domains: list[str], out=print) -> dict:
    """The first recipe.calibration_tokens of each domain's training split (BTM's averaging weights);
    a held-out-only domain without a training split gets none (its average is then uniform)."""
    sets = {}
    for domain in domains:
        try:
            sets |= evaluate.load_eval_sets(config, max_tokens=config.recipe.calibration_tokens, split="train",
                                            names=[domain])
        except DataError as e:
            out(f"[recipe] {domain}: no training split to calibrate BTM's posterior average on ({e}); "
                "it uses uniform weights there")
    return sets


def summarise(config, recipes, trials: list[dict], eval_sets: dict) -> dict:
    """Point estimates, paired-bootstrap intervals, best-per-column, compute, drops and routing."""
    domains = list(eval_sets)
    train_domains = recipes[0].domains
    names = list(trials[0])
    scores = {name: [t[name]["scores"] for t in trials] for name in names}
    reps = intervals.replicates(scores, domains, train_domains, num=config.recipe.bootstrap)
    rows = []
    for name in names:
        first = trials[0][name]
        stages = first["compute"]
        row = {"model": name,
               "ppl": {d: intervals.point(scores[name], d) for d in domains},
               "interval": {d: intervals.interval(reps[name][d]) for d in domains},
               "flops": float(np.mean([sum(rc.records[s]["flops"] for s in stages) for rc in recipes])),
               "tokens": int(np.mean([sum(rc.records[s]["tokens"] for s in stages) for rc in recipes])),
               "stages": stages}
        row["avg_ppl"] = float(np.mean([row["ppl"][d] for d in train_domains]))
        row["avg_interval"] = intervals.interval(reps[name]["avg"])
        if first.get("drop"):
            row["drop"] = {k: (None if any(t[name]["drop"][k] is None for t in trials)
                               else float(np.mean([t[name]["drop"][k] for t in trials]))) for k in ("train", "eval")}
        if "priors" in first:
            row["priors"] = first["priors"]
        rows.append(row)
    best = {column: intervals.best(reps, column) for column in [*domains, "avg"]}
    routing_by_model = {name: {d: np.mean([t[name]["routing"][d]["expert_usage"] for t in trials], axis=0).tolist()
                               for d in domains}
                        for name in names if trials[0][name].get("routing")}  # every MoE model
    routing = routing_by_model["BTX"]
    summary = {"domains": domains, "train_domains": train_domains, "models": rows, "best": best, "routing": routing,
               "routing_by_model": routing_by_model,
               "trials": len(trials), "bootstrap": config.recipe.bootstrap,
               "tokens_scored": {d: evaluate.scored_tokens(b) for d, b in eval_sets.items()},
               "documents": {d: int(len(scores["seed"][0][d].nll)) for d in domains},
               "calibration_tokens": config.recipe.calibration_tokens,
               "stages": recipes[0].records}
    if "opt_out" in trials[0]["BTX"]:
        summary["opt_out"] = opt_out(trials, domains, config.recipe.bootstrap)
    return summary


def opt_out(trials: list[dict], domains: list[str], num: int) -> dict[str, dict]:
    """{removed expert: {domain: {"ppl", "delta", "interval"}}}: BTX with that expert masked against the
    full BTX on the same documents and trials (delta and its paired 95% interval; > 0: the expert helped)."""
    labels = list(trials[0]["BTX"]["opt_out"])
    scores = {"BTX": [t["BTX"]["scores"] for t in trials]}
    scores |= {f"BTX without {label}": [t["BTX"]["opt_out"][label] for t in trials] for label in labels}
    deltas = intervals.paired_deltas(scores, "BTX", domains, num=num)
    return {label: deltas[f"BTX without {label}"] for label in labels}


def save_scores(path: epath.Path, scored: list[dict]) -> None:
    """Every model's per-document NLL and token counts, per trial and domain (to recompute any interval);
    BTX's opt-out scores as the models ``BTX without <expert>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, trial in enumerate(scored):
        for name, row in trial.items():
            masked = {f"{name} without {label}": s for label, s in row.get("opt_out", {}).items()}
            for model, model_scores in {name: row["scores"], **masked}.items():
                for domain, s in model_scores.items():
                    arrays[f"{model}|{i}|{domain}|nll"] = s.nll
                    arrays[f"{model}|{i}|{domain}|tokens"] = s.tokens
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)

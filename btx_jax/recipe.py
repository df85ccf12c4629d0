"""``python -m btx_jax.recipe --config configs/btx_demo.py --workdir runs/btx``: BTX end to end.

Stages, each under ``workdir/<stage>/`` (``btx_jax/stages.py`` decides what is done: a stage
is skipped only when its config fingerprint and its inputs are unchanged; an interrupted
training stage resumes from its checkpoint):

1. ``seed``: the dense seed on the domain mixture, or ``recipe.seed_from`` imported (a Hugging
   Face directory or a checkpoint: a pretrained seed);
2. ``branch/<domain>``: one dense expert per domain, from the seed (one after another, or as
   parallel processes with ``recipe.parallel_branches``);
3. ``mix``: the checkpoint surgeon (experts + the seed's FFN, centroid router);
4. ``finetune``: the MoE on the mixture, with the load-balancing loss;
5. baselines at BTX's compute: ``baseline/dense`` (the seed trained on), ``baseline/upcycle``
   (an MoE of seed copies); BTM (ensemble and averages of the branches) is evaluated directly;
   variants ``variant/<name>``: top1, no_load_balance, random_router;
6. evaluation (``btx_jax/compare.py``) and ``report/``: every model on the same held-out
   documents, with paired-bootstrap intervals over documents and ``recipe.seeds`` trials.

``recipe.sweep`` runs the whole comparison at several compute splits (``btx_jax/sweep.py``).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from btx_jax import compare as compare_lib, compilation_cache, config as config_lib, evaluate, intervals, mix, report, sweep
from btx_jax import pretrained_seed, train
from btx_jax.data.datasets import DataError
from btx_jax.flops import train_flops_per_token
from btx_jax.stages import StageStore, relevant_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------- stage configs

def _items(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def dense_config(config, steps: int, *, lr=None, warmup=None, init_from="", domain=None) -> ConfigDict:
    """A dense training config from the recipe config (its model, data, optim and train sections)."""
    c = copy.deepcopy(config)
    c.moe.num_experts = 0
    c.train.update(steps=steps, init_from=init_from, eval_every=steps, checkpoint_every=min(c.train.checkpoint_every, steps),
                   eval_batches=1)  # a stage's own eval is a progress line; the recipe's eval stage measures
    c.optim.update(lr=c.optim.lr if lr is None else lr)
    c.optim.warmup_steps = min(c.optim.warmup_steps if warmup is None else warmup, steps - 1)
    if domain is not None:
        c.data.weights = ConfigDict({d: float(d == domain) for d in c.data.domains})
    return c


def moe_config(config, steps: int, init_from: str, **moe_overrides) -> ConfigDict:
    c = copy.deepcopy(config)
    c.moe.update(**moe_overrides)
    c.train.update(steps=steps, init_from=init_from, eval_every=steps, checkpoint_every=min(c.train.checkpoint_every, steps),
                   eval_batches=1)
    c.optim.update(lr=config.recipe.finetune_lr, warmup_steps=min(config.recipe.finetune_warmup, steps - 1))
    return c


def compute(c, steps: int | None = None) -> dict:
    """Tokens and training FLOPs (6 x active params x tokens + attention) of a training config."""
    steps = c.train.steps if steps is None else steps
    tokens = steps * c.data.batch_size * c.data.seq_len
    per_token = train_flops_per_token(c.model, c.data.seq_len, c.moe if c.moe.num_experts else None)
    return {"steps": steps, "tokens": tokens, "flops": per_token * tokens}


def matched_steps(c, flops: float) -> int:
    """Steps of config `c` that spend `flops`."""
    return max(1, int(round(flops / compute(c, 1)["flops"])))


# ---------------------------------------------------------------------------------- the recipe

TRAIN_SECTIONS = ("model", "data", "optim", "train")
MIX_SECTIONS = ("model", "moe", "mix", "data")


class Recipe:
    """Runs the stages of one trial in order; a stage whose fingerprint is unchanged is skipped."""

    def __init__(self, config, workdir: str, out=print):
        self.config, self.workdir, self.out = config, os.path.abspath(workdir), out
        self.domains = sorted(config.data.domains.keys())
        self.store = StageStore(self.workdir, out, config.recipe.rerun_from)

    @property
    def records(self) -> dict[str, dict]:
        return self.store.records

    def path(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    def _begin_train(self, stage: str, c, inputs: list[str]) -> dict | None:
        sections = TRAIN_SECTIONS + (("moe",) if c.moe.num_experts else ())
        return self.store.begin(stage, relevant_config(c, sections), inputs)

    def _finish_train(self, stage: str, c, seconds: float, final_eval: dict) -> dict:
        return self.store.finish(stage, {**compute(c), "kind": "moe" if c.moe.num_experts else "dense",
                                         "seconds": seconds, "final_eval": final_eval})

    def train_stage(self, stage: str, c, inputs: list[str]) -> dict:
        done = self._begin_train(stage, c, inputs)
        if done is not None:
            return done
        self.out(f"[recipe] {stage}: training {c.train.steps} steps"
                 + (f" ({c.moe.num_experts} experts)" if c.moe.num_experts else "") + f" -> {self.path(stage)}")
        start = time.perf_counter()
        final = train.run(c, self.path(stage))
        return self._finish_train(stage, c, time.perf_counter() - start, final)

    def mix_stage(self, stage: str, inputs: list[str], **mix_overrides) -> dict:
        c = copy.deepcopy(self.config)
        c.mix.update(output=os.path.join(self.path(stage), "checkpoint"), **mix_overrides)
        done = self.store.begin(stage, relevant_config(c, MIX_SECTIONS), inputs)
        if done is not None:
            return done
        if os.path.exists(c.mix.output):  # written, but the stage marker was not: redo
            shutil.rmtree(c.mix.output)
        manifest = mix.run(c, out=self.out)
        return self.store.finish(stage, {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "mix",
                                         "seconds": manifest["seconds"], "router_init": c.mix.router_init})

    def import_seed(self, source: str) -> dict:
        """The seed stage for a pretrained seed (btx_jax/pretrained_seed.py). No training: zero FLOPs."""
        fields = relevant_config(self.config, ("model",)) | {"recipe.seed_from": os.path.abspath(source)}
        done = self.store.begin("seed", fields, [])
        if done is not None:
            return done
        start = time.perf_counter()
        pretrained_seed.write_seed(self.config, source, os.path.join(self.path("seed"), "checkpoints", "0"), self.out)
        return self.store.finish("seed", {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "import",
                                          "seconds": time.perf_counter() - start, "source": source})

    def branches(self) -> None:
        r = self.config.recipe
        configs = {f"branch/{d}": dense_config(self.config, r.branch_steps, lr=r.branch_lr, warmup=r.branch_warmup,
                                               init_from=self.path("seed"), domain=d) for d in self.domains}
        if not r.parallel_branches:
            for stage, c in configs.items():
                self.train_stage(stage, c, ["seed"])
            return
        pending = {stage: c for stage, c in configs.items() if self._begin_train(stage, c, ["seed"]) is None}
        self._parallel(pending)

    def _parallel(self, stages: dict) -> None:
        """Each stage as its own `python -m btx_jax.train` process, all at once; recorded when all succeed."""
        procs, start = {}, time.perf_counter()
        for stage, c in stages.items():
            config_file = os.path.join(self.path(stage), "stage_config.py")
            with open(config_file, "w") as f:
                f.write("import json\nfrom ml_collections import ConfigDict\n\n\ndef get_config(variant=None):\n"
                        f"    return ConfigDict(json.loads({c.to_json()!r}))\n")
            log = open(os.path.join(self.path(stage), "train.log"), "w")
            self.out(f"[recipe] {stage}: started as a process (log: {log.name})")
            procs[stage] = subprocess.Popen([sys.executable, "-m", "btx_jax.train", f"--config={config_file}",
                                             f"--workdir={self.path(stage)}"], cwd=REPO, stdout=log, stderr=log)
        failed = [s for s, p in procs.items() if p.wait() != 0]
        if failed:
            raise RuntimeError(f"branch processes failed: {failed}; see their train.log, then rerun to resume")
        for stage, c in stages.items():
            self._finish_train(stage, c, time.perf_counter() - start, {})

    def run(self) -> None:
        """Every training and surgery stage of the comparison (evaluation is btx_jax.compare's job)."""
        config, r = self.config, self.config.recipe
        branches = [f"branch/{d}" for d in self.domains]
        if r.seed_from:
            self.import_seed(r.seed_from)
        else:
            self.train_stage("seed", dense_config(config, r.seed_steps), [])
        self.branches()
        mix_common = dict(experts=",".join(self.path(b) for b in branches), seed=self.path("seed"),
                          domains=",".join(self.domains))
        self.mix_stage("mix", ["seed", *branches], **mix_common)
        mixed = os.path.join(self.path("mix"), "checkpoint")
        self.train_stage("finetune", moe_config(config, r.finetune_steps, mixed), ["mix"])

        after_seed = sum(self.records[b]["flops"] for b in branches) + self.records["finetune"]["flops"]
        baselines = _items(r.baselines)
        if "dense" in baselines:
            # the seed trained on like a branch (same lr and warmup), but on the mixture
            steps_ = matched_steps(dense_config(config, 1), after_seed)
            self.train_stage("baseline/dense", dense_config(config, steps_, lr=r.branch_lr, warmup=r.branch_warmup,
                                                            init_from=self.path("seed")), ["seed"])
        if "upcycle" in baselines:
            self.mix_stage("baseline/upcycle_mix", ["seed"], experts="", seed=self.path("seed"), seed_expert=False,
                           copies=True, copy_noise=0.01, router_init="normal")
            steps_ = matched_steps(moe_config(config, 1, ""), after_seed)
            self.train_stage("baseline/upcycle", moe_config(
                config, steps_, os.path.join(self.path("baseline/upcycle_mix"), "checkpoint")), ["baseline/upcycle_mix"])
        variants = _items(r.variants)
        if "top1" in variants:
            self.train_stage("variant/top1", moe_config(config, r.finetune_steps, mixed, top_k=1), ["mix"])
        if "no_load_balance" in variants:
            self.train_stage("variant/no_load_balance",
                             moe_config(config, r.finetune_steps, mixed, load_balance_weight=0.0), ["mix"])
        if "random_router" in variants:
            self.mix_stage("variant/random_router_mix", ["seed", *branches], **mix_common, router_init="normal")
            self.train_stage("variant/random_router", moe_config(
                config, r.finetune_steps, os.path.join(self.path("variant/random_router_mix"), "checkpoint")),
                ["variant/random_router_mix"])

    def models(self) -> list[dict]:
        """Every trained model: name, stage, config (MoE models evaluated dropless), the stages it cost."""
        config = self.config
        branches = [f"branch/{d}" for d in self.domains]
        dense = dense_config(config, 1)

        def moe(**overrides):
            return moe_config(config, 2, "", dispatcher="dropless", expert_dropout=0.0, **overrides)

        models = [{"name": "seed", "stage": "seed", "config": dense, "compute": ["seed"]}]
        models += [{"name": f"expert:{d}", "stage": f"branch/{d}", "config": dense,
                    "compute": ["seed", f"branch/{d}"]} for d in self.domains]
        models.append({"name": "BTX", "stage": "finetune", "config": moe(), "compute": ["seed", *branches, "finetune"]})
        if "baseline/dense" in self.records:
            models.append({"name": "dense (compute-matched)", "stage": "baseline/dense", "config": dense,
                           "compute": ["seed", "baseline/dense"]})
        if "baseline/upcycle" in self.records:
            models.append({"name": "sparse upcycling", "stage": "baseline/upcycle", "config": moe(),
                           "compute": ["seed", "baseline/upcycle"]})
        for variant, overrides in {"top1": dict(top_k=1), "no_load_balance": {}, "random_router": {}}.items():
            if f"variant/{variant}" in self.records:
                models.append({"name": f"BTX {variant.replace('_', ' ')}", "stage": f"variant/{variant}",
                               "config": moe(**overrides), "compute": ["seed", *branches, f"variant/{variant}"]})
        return models


# ---------------------------------------------------------------------------------- trials and results

def trial_config(config, trial: int) -> ConfigDict:
    """Trial i: another initialisation and data order (train.seed and data.seed + i); trial 0 is the config."""
    c = copy.deepcopy(config)
    c.train.seed += trial
    c.data.seed += trial
    return c


def trial_dir(workdir: str, trial: int) -> str:
    """Trial 0 lives in the workdir itself, so adding seeds later reuses the first run."""
    return workdir if trial == 0 else os.path.join(workdir, f"trial{trial}")


def compare(config, workdir: str, out=print) -> dict:
    """Trains every trial's stages, scores every model on the same documents, and summarises with intervals."""
    r = config.recipe
    recipes = [Recipe(trial_config(config, i), trial_dir(workdir, i), out) for i in range(r.seeds)]
    for i, recipe in enumerate(recipes):
        if r.seeds > 1:
            out(f"[recipe] trial {i + 1}/{r.seeds} (train.seed={recipe.config.train.seed}, "
                f"data.seed={recipe.config.data.seed}) -> {recipe.workdir}")
        recipe.run()
    out(f"[recipe] eval: {'the whole held-out split' if not r.eval_tokens else f'{r.eval_tokens:,} tokens'} "
        f"per domain; BTM weights calibrated on {r.calibration_tokens:,} training tokens per domain")
    eval_sets = evaluate.load_eval_sets(config, max_tokens=r.eval_tokens)
    calibration = calibration_sets(config, list(eval_sets), out)
    scorer = compare_lib.Scorer()
    trials = [compare_lib.score_trial(recipe, eval_sets, calibration, "btm" in _items(r.baselines), scorer, out)
              for recipe in recipes]
    results = summarise(config, recipes, trials, eval_sets)
    save_scores(os.path.join(workdir, "report", "scores.npz"), trials)
    return results


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
    routing = {d: np.mean([t["BTX"]["routing"][d]["expert_usage"] for t in trials], axis=0).tolist() for d in domains}
    return {"domains": domains, "train_domains": train_domains, "models": rows, "best": best, "routing": routing,
            "trials": len(trials), "bootstrap": config.recipe.bootstrap,
            "tokens_scored": {d: evaluate.scored_tokens(b) for d, b in eval_sets.items()},
            "documents": {d: int(len(scores["seed"][0][d].nll)) for d in domains},
            "calibration_tokens": config.recipe.calibration_tokens,
            "stages": recipes[0].records}


def save_scores(path: str, trials: list[dict]) -> None:
    """Every model's per-document NLL and token counts, per trial and domain (to recompute any interval)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {}
    for i, trial in enumerate(trials):
        for name, row in trial.items():
            for domain, s in row["scores"].items():
                arrays[f"{name}|{i}|{domain}|nll"] = s.nll
                arrays[f"{name}|{i}|{domain}|tokens"] = s.tokens
    np.savez_compressed(path, **arrays)


def check(config) -> None:
    """Recipe-specific config checks, before any work starts."""
    config_lib.validate(config)
    r = config.recipe
    if not config.moe.num_experts:
        raise config_lib.ConfigError("moe.num_experts", "is 0", "set it to the number of domains (+1 with mix.seed_expert)")
    want = len(config.data.domains) + (1 if config.mix.seed_expert else 0)
    if config.moe.num_experts != want:
        raise config_lib.ConfigError("moe.num_experts", f"{config.moe.num_experts} experts but {len(config.data.domains)} "
                                     f"domains{' + the seed expert' if config.mix.seed_expert else ''}",
                                     f"set moe.num_experts={want}")
    unknown = set(_items(r.baselines)) - {"dense", "btm", "upcycle"}
    unknown |= set(_items(r.variants)) - {"top1", "no_load_balance", "random_router"}
    if unknown:
        raise config_lib.ConfigError("recipe", f"unknown baselines/variants {sorted(unknown)}",
                                     "baselines: dense, btm, upcycle; variants: top1, no_load_balance, random_router")
    if r.seeds < 1:
        raise config_lib.ConfigError("recipe.seeds", f"must be >= 1, got {r.seeds}", "use 1 (bootstrap only) or 3+")
    if r.bootstrap < 100:
        raise config_lib.ConfigError("recipe.bootstrap", f"{r.bootstrap} replicates are too few for a 95% interval",
                                     "use 1000 (the default) or more")
    if r.eval_tokens < 0 or r.calibration_tokens <= 0:
        raise config_lib.ConfigError("recipe.eval_tokens", "eval_tokens must be >= 0 (0: the whole split) and "
                                     "calibration_tokens > 0", "use e.g. eval_tokens=100000, calibration_tokens=20000")
    stages = {"seed", "branch", "mix", "finetune", "baseline", "variant"}
    for name in _items(r.rerun_from):
        if name.split("/")[0] not in stages:
            raise config_lib.ConfigError("recipe.rerun_from", f"unknown stage {name!r}",
                                         "name a stage: seed, branch[/<domain>], mix, finetune, baseline/<name>, "
                                         "variant/<name>")
    if r.seed_from:
        if not os.path.exists(os.path.expanduser(r.seed_from)):
            raise config_lib.ConfigError("recipe.seed_from", f"not found: {r.seed_from!r}",
                                         "give a Hugging Face model directory or a btx_jax checkpoint")
        if r.seed_share or "seed_share" in r.sweep:
            raise config_lib.ConfigError("recipe.seed_share", "splits a seed budget, but recipe.seed_from gives a "
                                         "pretrained seed", "set recipe.seed_share=0 and recipe.sweep=''")
    sweep.parse(r.sweep)
    sweep.resolve(config)  # checks recipe.seed_share


def run(config, workdir: str, out=print) -> dict:
    """The comparison (or, with recipe.sweep, one comparison per sweep point) and its report."""
    check(config)
    workdir = os.path.abspath(workdir)
    if config.recipe.sweep:
        return sweep.run(config, workdir, compare, out)
    config = sweep.resolve(config)
    results = compare(config, workdir, out)
    report.write(os.path.join(workdir, "report"), results, workdir, out=out)
    return results


def _define_flags():
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config, e.g. configs/btx_demo.py.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage, the evaluation and the report.")


def main(argv):
    del argv
    compilation_cache.enable()
    logging.set_verbosity(logging.ERROR)
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except train.TrainingInterrupted as e:
        print("[recipe] stopped; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.args[0])
    except (*train.USER_ERRORS, mix.MixError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""``python -m btx_jax.recipe --config configs/btx_demo.py --workdir runs/btx``: BTX end to end.

Stages, each under ``workdir/<stage>/`` and each resumable (a finished stage has a
``stage.json`` and is skipped; an interrupted training stage resumes from its checkpoint):

1. ``seed``: the dense seed on the domain mixture;
2. ``branch/<domain>``: one dense expert per domain, from the seed (one after another, or as
   parallel processes with ``recipe.parallel_branches``);
3. ``mix``: the checkpoint surgeon (experts + the seed's FFN, centroid router);
4. ``finetune``: the MoE on the mixture, with the load-balancing loss;
5. baselines at BTX's compute: ``baseline/dense`` (the seed trained on), ``baseline/upcycle``
   (an MoE of seed copies); BTM (ensemble and averages of the branches) is evaluated directly;
   variants ``variant/<name>``: top1, no_load_balance, random_router;
6. ``eval`` and ``report``: per-domain held-out perplexity of every model (training domains
   and ``data.eval_domains``), compute, routing statistics, tables and plots.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from btx_jax import btm, checkpoint, config as config_lib, mix, sharding, steps, train
from btx_jax.flops import train_flops_per_token
from btx_jax.state import make_setup

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

class Recipe:
    """Runs the stages in order, skipping finished ones; `records` holds each stage's compute."""

    def __init__(self, config, workdir: str, out=print):
        self.config, self.workdir, self.out = config, os.path.abspath(workdir), out
        self.domains = sorted(config.data.domains.keys())
        self.records: dict[str, dict] = {}

    def path(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    def _finished(self, stage: str) -> dict | None:
        marker = os.path.join(self.path(stage), "stage.json")
        if os.path.exists(marker):
            with open(marker) as f:
                return json.load(f)
        return None

    def _finish(self, stage: str, record: dict) -> dict:
        os.makedirs(self.path(stage), exist_ok=True)
        tmp = os.path.join(self.path(stage), "stage.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(self.path(stage), "stage.json"))
        self.records[stage] = record
        return record

    def train_stage(self, stage: str, c) -> dict:
        done = self._finished(stage)
        if done is not None:
            self.out(f"[recipe] {stage}: done, skipping")
            self.records[stage] = done
            return done
        self.out(f"[recipe] {stage}: training {c.train.steps} steps"
                 + (f" ({c.moe.num_experts} experts)" if c.moe.num_experts else "") + f" -> {self.path(stage)}")
        start = time.perf_counter()
        final = train.run(c, self.path(stage))
        return self._finish(stage, {**compute(c), "kind": "moe" if c.moe.num_experts else "dense",
                                    "seconds": time.perf_counter() - start, "final_eval": final})

    def mix_stage(self, stage: str, **mix_overrides) -> dict:
        done = self._finished(stage)
        if done is not None:
            self.out(f"[recipe] {stage}: done, skipping")
            self.records[stage] = done
            return done
        c = copy.deepcopy(self.config)
        c.mix.update(output=os.path.join(self.path(stage), "checkpoint"), **mix_overrides)
        out_dir = c.mix.output
        if os.path.exists(out_dir):  # written, but the stage marker was not: redo
            import shutil
            shutil.rmtree(out_dir)
        manifest = mix.run(c, out=self.out)
        return self._finish(stage, {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "mix",
                                    "seconds": manifest["seconds"], "router_init": c.mix.router_init})

    def branches(self) -> None:
        r = self.config.recipe
        configs = {d: dense_config(self.config, r.branch_steps, lr=r.branch_lr, warmup=r.branch_warmup,
                                   init_from=self.path("seed"), domain=d) for d in self.domains}
        if r.parallel_branches:
            self._parallel({f"branch/{d}": c for d, c in configs.items()})
        for d, c in configs.items():
            self.train_stage(f"branch/{d}", c)

    def _parallel(self, stages: dict) -> None:
        """Each unfinished stage as its own `python -m btx_jax.train` process; their stage.json are written after."""
        procs = {}
        for stage, c in stages.items():
            if self._finished(stage) is not None:
                continue
            os.makedirs(self.path(stage), exist_ok=True)
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

    def run(self) -> dict:
        config, r = self.config, self.config.recipe
        seed_config = dense_config(config, r.seed_steps)
        self.train_stage("seed", seed_config)
        self.branches()
        seed_expert = config.mix.seed_expert
        experts = ",".join(self.path(f"branch/{d}") for d in self.domains)
        mix_common = dict(experts=experts, seed=self.path("seed"), domains=",".join(self.domains))
        self.mix_stage("mix", **mix_common)
        mixed = os.path.join(self.path("mix"), "checkpoint")
        finetune = moe_config(config, r.finetune_steps, mixed)
        self.train_stage("finetune", finetune)

        after_seed = (sum(self.records[f"branch/{d}"]["flops"] for d in self.domains)
                      + self.records["finetune"]["flops"])
        baselines = _items(r.baselines)
        if "dense" in baselines:
            probe = dense_config(config, 1)
            # the seed trained on like a branch (same lr and warmup), but on the mixture
            self.train_stage("baseline/dense", dense_config(config, matched_steps(probe, after_seed), lr=r.branch_lr,
                                                            warmup=r.branch_warmup, init_from=self.path("seed")))
        if "upcycle" in baselines:
            self.mix_stage("baseline/upcycle_mix", experts="", seed=self.path("seed"), seed_expert=False,
                           copies=True, copy_noise=0.01, router_init="normal")
            probe = moe_config(config, 1, "")
            self.train_stage("baseline/upcycle", moe_config(config, matched_steps(probe, after_seed),
                                                           os.path.join(self.path("baseline/upcycle_mix"), "checkpoint")))
        variants = _items(r.variants)
        if "top1" in variants:
            self.train_stage("variant/top1", moe_config(config, r.finetune_steps, mixed, top_k=1))
        if "no_load_balance" in variants:
            self.train_stage("variant/no_load_balance", moe_config(config, r.finetune_steps, mixed,
                                                                   load_balance_weight=0.0))
        if "random_router" in variants:
            self.mix_stage("variant/random_router_mix", **mix_common, seed_expert=seed_expert, router_init="normal")
            self.train_stage("variant/random_router", moe_config(
                config, r.finetune_steps, os.path.join(self.path("variant/random_router_mix"), "checkpoint")))
        results = self.evaluate("btm" in baselines)
        from btx_jax import report
        report.write(self.path("report"), results, self.workdir, out=self.out)
        return results

    # ------------------------------------------------------------------------------ evaluation

    def models(self) -> list[dict]:
        """Every trained model: name, stage, config, and the stages whose compute it used."""
        config = self.config
        branches = [f"branch/{d}" for d in self.domains]
        models = [{"name": "seed", "stage": "seed", "config": dense_config(config, 1), "compute": ["seed"]}]
        models += [{"name": f"expert:{d}", "stage": f"branch/{d}", "config": dense_config(config, 1),
                    "compute": ["seed", f"branch/{d}"]} for d in self.domains]
        models.append({"name": "BTX", "stage": "finetune", "config": moe_config(config, 2, ""),
                       "compute": ["seed", *branches, "finetune"]})
        if "baseline/dense" in self.records:
            models.append({"name": "dense (compute-matched)", "stage": "baseline/dense",
                           "config": dense_config(config, 1), "compute": ["seed", "baseline/dense"]})
        if "baseline/upcycle" in self.records:
            models.append({"name": "sparse upcycling", "stage": "baseline/upcycle", "config": moe_config(config, 2, ""),
                           "compute": ["seed", "baseline/upcycle"]})
        overrides = {"top1": dict(top_k=1), "no_load_balance": {}, "random_router": {}}
        for variant, moe in overrides.items():
            if f"variant/{variant}" in self.records:
                models.append({"name": f"BTX {variant.replace('_', ' ')}", "stage": f"variant/{variant}",
                               "config": moe_config(config, 2, "", **moe), "compute": ["seed", *branches, f"variant/{variant}"]})
        return models

    def _params(self, c, stage):
        mesh = sharding.make_mesh(c.mesh)
        setup = make_setup(c, mesh)
        return setup, checkpoint.load_params(self.path(stage), setup.abstract_params)

    def evaluate(self, with_btm: bool) -> dict:
        """Per-domain held-out loss/perplexity of every model, compute, and BTX's routing per domain."""
        self.out("[recipe] eval: per-domain held-out perplexity of every model")
        eval_sets = train.load_eval_sets(self.config)
        rows = []
        for model in self.models():
            c = model["config"]
            setup, params = self._params(c, model["stage"])
            eval_step = steps.make_eval_step(setup, steps.batch_shardings(setup.mesh))
            metrics = train.evaluate(eval_step, params, eval_sets, steps.batch_shardings(setup.mesh))
            rows.append(self._row(model["name"], metrics, model["compute"]))
            if model["name"] == "BTX":
                routing = self.routing(setup, params, eval_sets)
        if with_btm:
            rows += self.btm_rows(eval_sets)
        return {"domains": list(eval_sets), "train_domains": self.domains, "models": rows, "routing": routing,
                "stages": self.records}

    def _row(self, name, metrics: dict, stages: list[str]) -> dict:
        flops = sum(self.records[s]["flops"] for s in stages)
        tokens = sum(self.records[s]["tokens"] for s in stages)
        ppl = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/ppl") and k.count("/") == 2}
        return {"model": name, "ppl": ppl, "avg_ppl": float(np.mean([ppl[d] for d in self.domains])),
                "flops": flops, "tokens": tokens, "stages": stages}

    def routing(self, setup, params, eval_sets) -> dict:
        """Fraction of each domain's routed tokens that go to each expert, per MoE layer: {domain: [L, E]}."""
        shardings = steps.batch_shardings(setup.mesh)
        fn = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b)[1]["expert_usage"]), setup.mesh)
        usage = {}
        for domain, batches in eval_sets.items():
            per_batch = [np.asarray(fn(params, steps.to_global(b, shardings))) for b in batches]
            usage[domain] = np.mean(per_batch, axis=0).tolist()
        return usage

    def btm_rows(self, eval_sets) -> list[dict]:
        """BTM: posterior-weighted ensemble of the branches; uniform and posterior-weighted parameter averages."""
        c = dense_config(self.config, 1)
        branch_stages = [f"branch/{d}" for d in self.domains]
        loaded = [self._params(c, s) for s in branch_stages]
        setup = loaded[0][0]
        branch_params = [jax.device_get(p) for _, p in loaded]
        logprob = btm.token_logprobs(setup.graphdef, setup.mesh)
        shardings = steps.batch_shardings(setup.mesh)
        ensemble_metrics, top1_metrics, priors = {}, {}, {}
        for domain, batches in eval_sets.items():
            ensemble = btm.PosteriorEnsemble(len(branch_params))
            top1 = btm.PosteriorEnsemble(len(branch_params), top1=True)
            nll, nll_top1, count = 0.0, 0.0, 0.0
            for batch in batches:
                logp = np.stack([np.asarray(logprob(p, steps.to_global(batch, shardings))) for _, p in loaded])
                nll -= float((ensemble(logp, batch) * batch["loss_mask"]).sum())
                nll_top1 -= float((top1(logp, batch) * batch["loss_mask"]).sum())
                count += float(batch["loss_mask"].sum())
            ensemble_metrics[f"eval/{domain}/ppl"] = float(np.exp(nll / max(count, 1.0)))
            top1_metrics[f"eval/{domain}/ppl"] = float(np.exp(nll_top1 / max(count, 1.0)))
            priors[domain] = ensemble.prior.tolist()
        compute_stages = ["seed", *branch_stages]
        rows = [{**self._row("BTM ensemble", ensemble_metrics, compute_stages), "priors": priors},
                self._row("sample-level routing (top-1 expert)", top1_metrics, compute_stages)]
        eval_step = steps.make_eval_step(setup, shardings)
        uniform = jax.device_put(btm.average_params(branch_params), jax.tree.map(lambda a: a.sharding, setup.abstract_params))
        rows.append(self._row("BTM uniform average", train.evaluate(eval_step, uniform, eval_sets, shardings),
                              compute_stages))
        weighted = {}
        for domain, batches in eval_sets.items():  # each domain: the average weighted by its ensemble prior
            avg = jax.device_put(btm.average_params(branch_params, priors[domain]),
                                 jax.tree.map(lambda a: a.sharding, setup.abstract_params))
            weighted.update(train.evaluate(eval_step, avg, {domain: batches}, shardings))
        rows.append(self._row("BTM posterior average", weighted, compute_stages))
        return rows


def run(config, workdir: str, out=print) -> dict:
    config_lib.validate(config)
    if not config.moe.num_experts:
        raise config_lib.ConfigError("moe.num_experts", "is 0", "set it to the number of domains (+1 with mix.seed_expert)")
    want = len(config.data.domains) + (1 if config.mix.seed_expert else 0)
    if config.moe.num_experts != want:
        raise config_lib.ConfigError("moe.num_experts", f"{config.moe.num_experts} experts but {len(config.data.domains)} "
                                     f"domains{' + the seed expert' if config.mix.seed_expert else ''}",
                                     f"set moe.num_experts={want}")
    unknown = set(_items(config.recipe.baselines)) - {"dense", "btm", "upcycle"}
    unknown |= set(_items(config.recipe.variants)) - {"top1", "no_load_balance", "random_router"}
    if unknown:
        raise config_lib.ConfigError("recipe", f"unknown baselines/variants {sorted(unknown)}",
                                     "baselines: dense, btm, upcycle; variants: top1, no_load_balance, random_router")
    return Recipe(config, workdir, out).run()


def _define_flags():
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config, e.g. configs/btx_demo.py.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage, the evaluation and the report.")


def main(argv):
    del argv
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

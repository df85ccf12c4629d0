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
   (an MoE of seed copies), ``baseline/drop_upcycle`` (Drop-Upcycling: copies, part re-initialized);
   BTM (ensemble and averages of the branches) is evaluated directly;
   variants ``variant/<name>``: top1, no_load_balance, random_router, bias_balance, sequence_balance;
   with ``recipe.extend_domain``, the expert lifecycle: ``extend/branch`` (an expert of a new domain),
   ``extend/add`` (added to the finetuned BTX, btx_jax/mix/lifecycle.py), ``extend/finetune``;
6. evaluation (``btx_jax/compare.py``) and ``report/``: every model on the same held-out
   documents, with paired-bootstrap intervals over documents and ``recipe.seeds`` trials.

``recipe.sweep`` runs the whole comparison at several compute splits (``btx_jax/sweep.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # before jax is imported: see btx_jax/host_memory.py
    from btx_jax import host_memory

    host_memory.reexec_with_huge_pages(keep_freed=True)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from btx_jax import compare as compare_lib, compilation_cache, config as config_lib, distributed, evaluate, graph, mix  # noqa: E402
from btx_jax import paths, plan, pretrained_seed, report, sweep, train  # noqa: E402
from btx_jax.graph import Stage, compute, dense_config, items as _items, moe_config  # noqa: E402
from btx_jax.mix import lifecycle  # noqa: E402
from btx_jax.results import calibration_sets, save_scores, summarise  # noqa: E402
from btx_jax.recipe_checks import check  # noqa: E402
from btx_jax.stages import StageStore, relevant_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # local: this package's checkout


# ---------------------------------------------------------------------------------- the recipe

TRAIN_SECTIONS = ("model", "data", "optim", "train")
MIX_SECTIONS = ("model", "moe", "mix", "data")
class StageNotReady(ValueError):
    """``recipe --stage`` was asked for a stage whose inputs are not finished."""


class Recipe:
    """Runs the stages of one trial in order; a stage whose fingerprint is unchanged is skipped."""

    def __init__(self, config, workdir: str, out=print):
        self.config, self.workdir, self.out = config, paths.resolve(workdir), out
        self.domains = sorted(config.data.domains.keys())
        self.store = StageStore(self.workdir, out, config.recipe.rerun_from)

    @property
    def records(self) -> dict[str, dict]:
        return self.store.records

    def path(self, stage: str) -> epath.Path:
        return self.workdir / stage

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
        final = train.run(c, str(self.path(stage)))
        return self._finish_train(stage, c, time.perf_counter() - start, final)

    def mix_stage(self, stage: str, inputs: list[str], c) -> dict:
        done = self.store.begin(stage, relevant_config(c, MIX_SECTIONS), inputs)
        if done is not None:
            return done
        if paths.resolve(c.mix.output).exists():  # written, but the stage marker was not: redo
            paths.resolve(c.mix.output).rmtree()
        manifest = mix.run(c, out=self.out)
        return self.store.finish(stage, {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "mix",
                                         "seconds": manifest["seconds"], "router_init": c.mix.router_init})

    def add_stage(self, stage: Stage) -> dict:
        """extend/add: the dense expert of stage.inputs[1] added to the MoE of stage.inputs[0] (E + 1 experts)."""
        c = stage.config
        done = self.store.begin(stage.name, relevant_config(c, MIX_SECTIONS), stage.inputs)
        if done is not None:
            return done
        output = paths.resolve(c.mix.output)
        if output.exists():  # written, but the stage marker was not: redo
            output.rmtree()
        moe_path, expert_path = (str(self.path(s)) for s in stage.inputs)
        manifest = lifecycle.add_expert(moe_path, expert_path, c.mix.domains, str(output), c, out=self.out)
        (self.path(stage.name) / "metrics.jsonl").write_text("")  # no training: read as no metrics
        return self.store.finish(stage.name, {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "mix",
                                              "seconds": manifest["seconds"], "added": c.mix.domains})

    def import_seed(self, source: str) -> dict:
        """The seed stage for a pretrained seed (btx_jax/pretrained_seed.py). No training: zero FLOPs."""
        done = self.store.begin("seed", self.import_fields(), [])
        if done is not None:
            return done
        start = time.perf_counter()
        pretrained_seed.write_seed(self.config, source, str(self.path("seed") / "checkpoints" / "0"), self.out)
        return self.store.finish("seed", {"steps": 0, "tokens": 0, "flops": 0.0, "kind": "import",
                                          "seconds": time.perf_counter() - start, "source": source})

    def _parallel(self, stages: dict) -> None:
        """Each stage as its own `python -m btx_jax.train` process, all at once; recorded when all succeed."""
        procs, logs, start = {}, [], time.perf_counter()
        local = tempfile.TemporaryDirectory(prefix="btx_stage_configs_")  # config_flags reads a local file
        for stage, c in stages.items():
            config_file = epath.Path(local.name) / f"{stage.replace('/', '_')}.py"
            config_file.write_text("import json\nfrom ml_collections import ConfigDict\n\n\ndef get_config(variant=None):\n"
                                   f"    return ConfigDict(json.loads({c.to_json()!r}))\n")
            (self.path(stage) / "stage_config.py").write_text(config_file.read_text())
            if paths.is_url(self.workdir):  # a subprocess cannot write its log to a URL: it shares ours
                log, where = None, "this output"
            else:
                log = open(self.path(stage) / "train.log", "w")  # noqa: SIM115  # local: checked just above
                logs.append(log)
                where = log.name
            self.out(f"[recipe] {stage}: started as a process (log: {where})")
            procs[stage] = subprocess.Popen([sys.executable, "-m", "btx_jax.train", f"--config={config_file}",
                                             f"--workdir={self.path(stage)}"], cwd=REPO, stdout=log, stderr=log)
        failed = [s for s, p in procs.items() if p.wait() != 0]
        for log in logs:
            log.close()
        local.cleanup()
        if failed:
            raise RuntimeError(f"branch processes failed: {failed}; see their train.log, then rerun to resume")
        for stage, c in stages.items():
            self._finish_train(stage, c, time.perf_counter() - start, {})

    # ------------------------------------------------------------------------------ the stage graph

    def stages(self) -> list[Stage]:
        """Every stage of this trial, inputs first (btx_jax/graph.py): --plan, --stage and run use this list."""
        return graph.trial_stages(self.config, self.path, self.domains)

    def run_stage(self, stage: Stage) -> dict:
        if stage.kind == "import":
            return self.import_seed(self.config.recipe.seed_from)
        if stage.kind == "mix":
            return self.mix_stage(stage.name, stage.inputs, stage.config)
        if stage.kind == "add":
            return self.add_stage(stage)
        return self.train_stage(stage.name, stage.config, stage.inputs)

    def run(self) -> None:
        """Every training and surgery stage of the comparison (evaluation is btx_jax.compare's job)."""
        branches_done = False
        for stage in self.stages():
            if not stage.name.startswith("branch/"):
                self.run_stage(stage)
            elif not branches_done:
                self.branches()
                branches_done = True

    def branches(self) -> None:
        """The branch stages: one after another, or as parallel processes (recipe.parallel_branches)."""
        stages = [s for s in self.stages() if s.name.startswith("branch/")]
        if not self.config.recipe.parallel_branches:
            for stage in stages:
                self.run_stage(stage)
            return
        self._parallel({s.name: s.config for s in stages if self._begin_train(s.name, s.config, s.inputs) is None})

    def run_one(self, name: str) -> dict:
        """One stage alone (``recipe --stage``, how the launch driver runs a stage on its own slice): its
        inputs must be finished, in this workdir, under this config."""
        graph = {s.name: s for s in self.stages()}
        if name not in graph:
            raise config_lib.ConfigError("recipe", f"--stage={name!r} is not a stage of this config",
                                         f"use one of: {', '.join(graph)} (see --plan)")
        self.check_finished(graph[name].inputs, f"stage {name}")
        return self.run_stage(graph[name])

    def check_finished(self, names: list[str], what: str) -> None:
        """Loads the records of `names` (each must be finished and current: its own inputs are checked too)."""
        graph = {s.name: s for s in self.stages()}
        for name in names:
            if name in self.records:
                continue
            self.check_finished(graph[name].inputs, what)
            if self.store.status(name, self.fields(graph[name]), graph[name].inputs) != "done":
                raise StageNotReady(f"{what} needs stage {name} finished first (under this config) in "
                                    f"{self.workdir}\n  fix: run it first (`--stage={name}`), or run the whole recipe "
                                    "without --stage; `--plan` shows what is done")
            self.store.load(name)

    def import_fields(self) -> dict:
        return relevant_config(self.config, ("model",)) | {"recipe.seed_from": str(paths.resolve(self.config.recipe.seed_from))}

    def fields(self, stage: Stage) -> dict:
        """The config fields that decide a stage (its fingerprint)."""
        if stage.kind == "import":
            return self.import_fields()
        if stage.kind in ("mix", "add"):
            return relevant_config(stage.config, MIX_SECTIONS)
        return relevant_config(stage.config, TRAIN_SECTIONS + (("moe",) if stage.config.moe.num_experts else ()))

    def expert_labels(self) -> list[str]:
        """What each expert of the BTX MoE was, by index: the surgeon makes expert i from branch i (the sorted
        domains), then the seed's own FFN with mix.seed_expert."""
        return [*self.domains, *(["seed"] if self.config.mix.seed_expert else [])]

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
        if "baseline/drop_upcycle" in self.records:
            models.append({"name": "Drop-Upcycling", "stage": "baseline/drop_upcycle", "config": moe(),
                           "compute": ["seed", "baseline/drop_upcycle"]})
        for variant, overrides in {"top1": dict(top_k=1), "no_load_balance": {}, "random_router": {},
                                   "bias_balance": dict(balance="bias"), "sequence_balance": {}}.items():
            if f"variant/{variant}" in self.records:
                models.append({"name": f"BTX {variant.replace('_', ' ')}", "stage": f"variant/{variant}",
                               "config": moe(**overrides), "compute": ["seed", *branches, f"variant/{variant}"]})
        new = config.recipe.get("extend_domain", "")
        if new and "extend/add" in self.records:  # BTX with one more expert, before and after its finetune
            extended = ["seed", *branches, "finetune", "extend/branch", "extend/add"]
            bigger = moe(num_experts=config.moe.num_experts + 1)
            models.append({"name": f"BTX + {new} expert", "stage": "extend/add", "config": bigger, "compute": extended})
            if "extend/finetune" in self.records:
                models.append({"name": f"BTX + {new} expert (finetuned)", "stage": "extend/finetune", "config": bigger,
                               "compute": [*extended, "extend/finetune"]})
        return models


# ---------------------------------------------------------------------------------- trials and results

def trial_config(config, trial: int) -> ConfigDict:
    """Trial i: another initialisation and data order (train.seed and data.seed + i); trial 0 is the config."""
    c = copy.deepcopy(config)
    c.train.seed += trial
    c.data.seed += trial
    return c


def trial_dir(workdir, trial: int) -> epath.Path:
    """Trial 0 lives in the workdir itself, so adding seeds later reuses the first run."""
    workdir = paths.resolve(workdir)
    return workdir if trial == 0 else workdir / f"trial{trial}"


def trials(config, workdir, out=print) -> list[Recipe]:
    return [Recipe(trial_config(config, i), trial_dir(workdir, i), out) for i in range(config.recipe.seeds)]


@dataclasses.dataclass
class Node:
    """A stage of one trial in the whole run: trial i > 0's stages are named ``trial<i>/<stage>``."""

    recipe: Recipe | None  # None for the report
    stage: Stage
    name: str
    inputs: list[str]  # qualified names


def stage_graph(config, workdir, out=print) -> list[Node]:
    """Every stage of every trial, then the report (which needs them all)."""
    nodes = []
    for i, recipe in enumerate(trials(config, workdir, out)):
        prefix = f"trial{i}/" if i else ""
        nodes += [Node(recipe, stage, prefix + stage.name, [prefix + n for n in stage.inputs]) for stage in recipe.stages()]
    everything = [n.name for n in nodes]
    return [*nodes, Node(None, Stage("report", "report", everything, None), "report", everything)]


def run_stage(config, workdir, name: str, out=print) -> None:
    """``recipe --stage=NAME``: one stage alone, its inputs finished (how the launch driver runs a stage)."""
    for node in stage_graph(config, workdir, out):
        if node.name == name:
            if node.stage.kind == "report":
                results = evaluate_trials(config, workdir, trials(config, workdir, out), out)
                report.write(paths.resolve(workdir) / "report", results, paths.resolve(workdir), out=out)
            else:
                node.recipe.run_one(node.stage.name)
            return
    names = [n.name for n in stage_graph(config, workdir, lambda _: None)]
    raise config_lib.ConfigError("recipe", f"--stage={name!r} is not a stage of this config",
                                 f"use one of: {', '.join(names)} (see --plan)")


def compare(config, workdir, out=print) -> dict:
    """Trains every trial's stages, scores every model on the same documents, and summarises with intervals."""
    r = config.recipe
    recipes = trials(config, workdir, out)
    for i, recipe in enumerate(recipes):
        if r.seeds > 1:
            out(f"[recipe] trial {i + 1}/{r.seeds} (train.seed={recipe.config.train.seed}, "
                f"data.seed={recipe.config.data.seed}) -> {recipe.workdir}")
        recipe.run()
    return evaluate_trials(config, workdir, recipes, out)


def evaluate_trials(config, workdir, recipes: list[Recipe], out=print) -> dict:
    """Every model of every (finished) trial scored on the same held-out documents, with intervals."""
    r = config.recipe
    if jax.process_count() > 1:  # per-document scores are gathered on one host
        raise config_lib.ConfigError("recipe", "the evaluation and report run as one process, not in a "
                                     f"{jax.process_count()}-process job", "run `--stage=report` on one host (every "
                                     "training stage is done by then; launch/btx.sh does this)")
    for recipe in recipes:
        recipe.check_finished([s.name for s in recipe.stages()], "the report")
    out(f"[recipe] eval: {'the whole held-out split' if not r.eval_tokens else f'{r.eval_tokens:,} tokens'} "
        f"per domain; BTM weights calibrated on {r.calibration_tokens:,} training tokens per domain")
    eval_sets = evaluate.load_eval_sets(config, max_tokens=r.eval_tokens)
    calibration = calibration_sets(config, list(eval_sets), out)
    scorer = compare_lib.Scorer()
    scored = [compare_lib.score_trial(recipe, eval_sets, calibration, "btm" in _items(r.baselines), scorer, out)
              for recipe in recipes]
    results = summarise(config, recipes, scored, eval_sets)
    save_scores(paths.resolve(workdir) / "report" / "scores.npz", scored)
    return results


def run(config, workdir, out=print) -> dict:
    """The comparison (or, with recipe.sweep, one comparison per sweep point) and its report."""
    check(config)
    workdir = paths.resolve(workdir)
    if config.recipe.sweep:
        return sweep.run(config, workdir, compare, out)
    config = sweep.resolve(config)
    results = compare(config, workdir, out)
    report.write(workdir / "report", results, workdir, out=out)
    return results


def _define_flags():
    global _CONFIG, _WORKDIR, _PLAN, _PLAN_FORMAT, _STAGE
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config, e.g. configs/btx_demo.py.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage, the evaluation and the report.")
    _PLAN = flags.DEFINE_bool("plan", False, "Print every stage (command, mesh, devices, FLOPs, estimated time, "
                              "memory per device, done or not) and exit; runs nothing.")
    _PLAN_FORMAT = flags.DEFINE_enum("plan_format", "text", ["text", "json"], "--plan output: a table or JSON "
                                     "(read by launch/btx.sh).")
    _STAGE = flags.DEFINE_string("stage", None, "Run this one stage (its inputs must be finished), e.g. branch/code "
                                 "or report; what launch/btx.sh runs on each stage's own slice.")
    distributed.define_flags()


def main(argv):
    del argv
    compilation_cache.enable()
    logging.set_verbosity(logging.ERROR)
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    config = _CONFIG.value
    try:
        if _PLAN.value:
            check(config, check_paths=False)
            config = sweep.resolve(config)
            stage_plan = plan.build(config, _WORKDIR.value, plan.config_args(sys.argv[1:]))
            print(plan.to_json(stage_plan) if _PLAN_FORMAT.value == "json" else plan.to_text(stage_plan))
            return
        distributed.initialize("[recipe]")
        if _STAGE.value:
            check(config)
            run_stage(sweep.resolve(config), _WORKDIR.value, _STAGE.value)
        else:
            run(config, _WORKDIR.value)
    except train.TrainingInterrupted as e:
        print("[recipe] stopped; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.args[0])
    except (*train.USER_ERRORS, mix.MixError, StageNotReady) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""The recipe as a graph of stages, built from the config alone (no stage has to have run).

``btx_jax.recipe`` runs it, ``recipe --plan`` prints it (btx_jax/plan.py), ``recipe --stage=NAME``
runs one node of it, and ``launch/btx.sh`` runs its groups on cloud resources: one description
for the laptop and the pod. Each training stage gets its own training config here (steps, lr,
init_from, mixture weights; MoE stages ``recipe.moe_mesh``), and the baselines get BTX's compute.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from etils import epath
from ml_collections import ConfigDict

from btx_jax import sharding
from btx_jax.flops import train_flops_per_token

KINDS = ("train", "import", "mix", "add", "report")


@dataclasses.dataclass
class Stage:
    """One node of the recipe: ``train`` (btx_jax.train), ``import`` (a pretrained seed), ``mix`` (the
    surgeon), ``add`` (an expert added to an MoE: btx_jax/mix/lifecycle.py) or ``report`` (evaluation of every model, then the report). It runs once its inputs are done."""

    name: str
    kind: str
    inputs: list[str]
    config: ConfigDict | None  # the training config (train) or the config with mix.* set (mix)


def items(spec: str) -> list[str]:
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
    """An MoE training config (the finetune and its variants); on ``recipe.moe_mesh`` when set."""
    c = copy.deepcopy(config)
    c.moe.update(**moe_overrides)
    if config.recipe.moe_mesh:
        c.mesh = sharding.parse_mesh_spec(config.recipe.moe_mesh)
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


def _mix_config(config, path: Callable[[str], epath.Path], stage: str, **mix_overrides) -> ConfigDict:
    c = copy.deepcopy(config)
    c.mix.update(output=str(path(stage) / "checkpoint"), **mix_overrides)
    return c


def trial_stages(config, path: Callable[[str], epath.Path], domains: list[str]) -> list[Stage]:
    """Every stage of one trial (`path(stage)` is its directory), inputs before the stages that read them."""
    r = config.recipe
    branches = [f"branch/{d}" for d in domains]
    seed, mixed = str(path("seed")), str(path("mix") / "checkpoint")
    stages = [Stage("seed", "import", [], None) if r.seed_from else
              Stage("seed", "train", [], dense_config(config, r.seed_steps))]
    stages += [Stage(b, "train", ["seed"], dense_config(config, r.branch_steps, lr=r.branch_lr, warmup=r.branch_warmup,
                                                         init_from=seed, domain=d)) for b, d in zip(branches, domains)]
    mix_common = dict(experts=",".join(str(path(b)) for b in branches), seed=seed, domains=",".join(domains))
    stages.append(Stage("mix", "mix", ["seed", *branches], _mix_config(config, path, "mix", **mix_common)))
    finetune = moe_config(config, r.finetune_steps, mixed)
    stages.append(Stage("finetune", "train", ["mix"], finetune))

    after_seed = sum(compute(s.config)["flops"] for s in stages if s.name in branches) + compute(finetune)["flops"]
    baselines = items(r.baselines)
    if "dense" in baselines:
        # the seed trained on like a branch (same lr and warmup), but on the mixture
        steps = matched_steps(dense_config(config, 1), after_seed)
        stages.append(Stage("baseline/dense", "train", ["seed"], dense_config(
            config, steps, lr=r.branch_lr, warmup=r.branch_warmup, init_from=seed)))
    if "upcycle" in baselines:
        stages.append(Stage("baseline/upcycle_mix", "mix", ["seed"], _mix_config(
            config, path, "baseline/upcycle_mix", experts="", seed=seed, seed_expert=False, copies=True,
            copy_noise=0.01, router_init="normal")))
        steps = matched_steps(moe_config(config, 1, ""), after_seed)
        stages.append(Stage("baseline/upcycle", "train", ["baseline/upcycle_mix"], moe_config(
            config, steps, str(path("baseline/upcycle_mix") / "checkpoint"))))
    if "drop_upcycle" in baselines:  # Drop-Upcycling (Nakamura et al., 2025): copies, part re-initialized
        stages.append(Stage("baseline/drop_upcycle_mix", "mix", ["seed"], _mix_config(
            config, path, "baseline/drop_upcycle_mix", experts="", seed=seed, seed_expert=False, copies=True,
            copy_noise=0.0, upcycle="drop", router_init="normal")))
        steps = matched_steps(moe_config(config, 1, ""), after_seed)
        stages.append(Stage("baseline/drop_upcycle", "train", ["baseline/drop_upcycle_mix"], moe_config(
            config, steps, str(path("baseline/drop_upcycle_mix") / "checkpoint"))))
    variants = items(r.variants)
    if "top1" in variants:
        stages.append(Stage("variant/top1", "train", ["mix"], moe_config(config, r.finetune_steps, mixed, top_k=1)))
    if "no_load_balance" in variants:
        stages.append(Stage("variant/no_load_balance", "train", ["mix"],
                            moe_config(config, r.finetune_steps, mixed, load_balance_weight=0.0)))
    for variant, balance in (("bias_balance", "bias"), ("sequence_balance", "sequence")):
        if variant in variants:  # the finetune with another load balancing (moe.balance)
            stages.append(Stage(f"variant/{variant}", "train", ["mix"],
                                moe_config(config, r.finetune_steps, mixed, balance=balance)))
    if "random_router" in variants:
        stages.append(Stage("variant/random_router_mix", "mix", ["seed", *branches], _mix_config(
            config, path, "variant/random_router_mix", **mix_common, router_init="normal")))
        stages.append(Stage("variant/random_router", "train", ["variant/random_router_mix"], moe_config(
            config, r.finetune_steps, str(path("variant/random_router_mix") / "checkpoint"))))
    if r.get("extend_domain", ""):
        stages += extend_stages(config, path, seed)
    return stages


def extended_data(config, domain: str) -> ConfigDict:
    """The config with `domain` moved from data.eval_domains to data.domains (with data.weights: the mean
    weight of the others)."""
    c = copy.deepcopy(config)
    c.data.domains = ConfigDict({**c.data.domains.to_dict(), domain: c.data.eval_domains[domain]})
    c.data.eval_domains = ConfigDict({k: v for k, v in c.data.eval_domains.items() if k != domain})
    if len(c.data.weights):
        weights = c.data.weights.to_dict()
        c.data.weights = ConfigDict({**weights, domain: sum(weights.values()) / len(weights)})
    return c


def extend_stages(config, path: Callable[[str], epath.Path], seed: str) -> list[Stage]:
    """recipe.extend_domain's expert: extend/branch (the seed trained on the new domain), extend/add (its
    FFN appended to the finetuned BTX, E + 1 experts; mix.output and mix.domains say where and which domain)
    and extend/finetune (recipe.extend_steps on the mixture plus the new domain, recipe.extend_trainable)."""
    r = config.recipe
    data = extended_data(config, r.extend_domain)
    branch = dense_config(data, r.extend_branch_steps or r.branch_steps, lr=r.branch_lr, warmup=r.branch_warmup, init_from=seed,
                          domain=r.extend_domain)
    add = moe_config(data, 1, "")
    add.mix.update(output=str(path("extend/add") / "checkpoints" / "0"), domains=r.extend_domain)
    finetune = moe_config(data, r.extend_steps, str(path("extend/add")), num_experts=config.moe.num_experts + 1)
    finetune.train.trainable = r.extend_trainable
    return [Stage("extend/branch", "train", ["seed"], branch),
            Stage("extend/add", "add", ["finetune", "extend/branch"], add),
            Stage("extend/finetune", "train", ["extend/add"], finetune)]


def groups(names_inputs: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Stage -> group: 0 without inputs, else one more than its latest input. A group's stages can run at
    the same time (each on its own slice); groups run in order."""
    group: dict[str, int] = {}
    for name, inputs in names_inputs:
        group[name] = 1 + max((group[i] for i in inputs), default=-1)
    return group

"""The recipe's own config checks (beyond config.validate), run before any stage starts, so that a
wrong baseline name or an impossible opt-out is refused in seconds, not after hours of training."""
from __future__ import annotations

import re

from btx_jax import config as config_lib, paths, sweep
from btx_jax.graph import items as _items
from btx_jax.models.moe import masked_indices


def check(config, check_paths: bool = True) -> None:
    """Recipe-specific config checks, before any work starts (`check_paths=False`: --plan, which may run
    on a workstation that cannot see the run's paths)."""
    config_lib.validate(config, check_paths=check_paths)
    r = config.recipe
    if not config.moe.num_experts:
        raise config_lib.ConfigError("moe.num_experts", "is 0", "set it to the number of domains (+1 with mix.seed_expert)")
    want = len(config.data.domains) + (1 if config.mix.seed_expert else 0)
    if config.moe.num_experts != want:
        raise config_lib.ConfigError("moe.num_experts", f"{config.moe.num_experts} experts but {len(config.data.domains)} "
                                     f"domains{' + the seed expert' if config.mix.seed_expert else ''}",
                                     f"set moe.num_experts={want}")
    unknown = set(_items(r.baselines)) - {"dense", "btm", "upcycle", "drop_upcycle"}
    unknown |= set(_items(r.variants)) - {"top1", "no_load_balance", "random_router", "bias_balance", "sequence_balance"}
    if unknown:
        raise config_lib.ConfigError("recipe", f"unknown baselines/variants {sorted(unknown)}",
                                     "baselines: dense, btm, upcycle, drop_upcycle; variants: top1, no_load_balance, "
                                     "random_router, bias_balance, sequence_balance")
    left = config.moe.num_experts - len(masked_indices(config.moe.masked_experts))
    if r.opt_out and left - 1 < config.moe.top_k:
        raise config_lib.ConfigError("recipe.opt_out", f"masking one more of the {left} experts left would leave "
                                     f"fewer than top_k={config.moe.top_k}", "set recipe.opt_out=False")
    if r.seeds < 1:
        raise config_lib.ConfigError("recipe.seeds", f"must be >= 1, got {r.seeds}", "use 1 (bootstrap only) or 3+")
    if r.bootstrap < 100:
        raise config_lib.ConfigError("recipe.bootstrap", f"{r.bootstrap} replicates are too few for a 95% interval",
                                     "use 1000 (the default) or more")
    if r.eval_tokens < 0 or r.calibration_tokens <= 0:
        raise config_lib.ConfigError("recipe.eval_tokens", "eval_tokens must be >= 0 (0: the whole split) and "
                                     "calibration_tokens > 0", "use e.g. eval_tokens=100000, calibration_tokens=20000")
    if r.extend_domain:
        if r.extend_domain not in config.data.eval_domains:
            raise config_lib.ConfigError("recipe.extend_domain", f"{r.extend_domain!r} is not in data.eval_domains "
                                         f"({sorted(config.data.eval_domains)})", "name a held-out domain that no "
                                         "stage trains on (e.g. docs in configs/btx_demo.py)")
        if r.extend_steps < 1:
            raise config_lib.ConfigError("recipe.extend_steps", f"must be >= 1, got {r.extend_steps}", "use e.g. 50")
        if r.extend_branch_steps < 0:
            raise config_lib.ConfigError("recipe.extend_branch_steps", f"must be >= 0, got {r.extend_branch_steps}",
                                         "use 0 (recipe.branch_steps) or a number of steps")
        try:
            re.compile(r.extend_trainable)
        except re.error as error:
            raise config_lib.ConfigError("recipe.extend_trainable", f"not a regular expression ({error}): "
                                         f"{r.extend_trainable!r}", "use e.g. router, or '' for every param") from None
    stages = {"seed", "branch", "mix", "finetune", "baseline", "variant", "extend"}
    for name in _items(r.rerun_from):
        if name.split("/")[0] not in stages:
            raise config_lib.ConfigError("recipe.rerun_from", f"unknown stage {name!r}",
                                         "name a stage: seed, branch[/<domain>], mix, finetune, baseline/<name>, "
                                         "variant/<name>, extend[/<name>]")
    if r.seed_from:
        if check_paths and not paths.resolve(r.seed_from).exists():
            raise config_lib.ConfigError("recipe.seed_from", f"not found: {r.seed_from!r}",
                                         "give a Hugging Face model directory or a btx_jax checkpoint")
        if r.seed_share or "seed_share" in r.sweep:
            raise config_lib.ConfigError("recipe.seed_share", "splits a seed budget, but recipe.seed_from gives a "
                                         "pretrained seed", "set recipe.seed_share=0 and recipe.sweep=''")
    sweep.parse(r.sweep)
    sweep.resolve(config)  # checks recipe.seed_share

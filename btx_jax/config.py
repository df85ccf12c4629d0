"""The config schema and the one validation pass every entry point runs first.

Config files (``configs/*.py``) start from :func:`base_config` and change fields; the
schema here is the single list of fields that exist, so a typo in a config file or an
override is caught before any work starts, with the field's name and a fix.
"""
from __future__ import annotations

import difflib
import math
import os
import re

from ml_collections import ConfigDict

# Sections whose keys are chosen by the user (domain names), not by the schema.
_FREE_FORM = ("data.domains", "data.weights", "data.eval_domains")
ROUTER_INITS = ("normal", "zeros", "centroid")
UPCYCLES = ("copy", "noise", "drop")

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ROPE_SCALINGS = ("none", "linear", "llama3")
DISPATCHERS = ("einsum", "alltoall", "dropless", "reference")
PRIORITIES = ("token", "confidence")
GROUPED_IMPLS = ("auto", "blocks", "native")
BALANCES = ("aux", "sequence", "bias")
TOKENIZERS = ("byte", "sentencepiece")


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"config.{field}: {problem}\n  fix: {fix}")
        self.field = field


def base_config() -> ConfigDict:
    """Every field that exists, with its default. Config files override these."""
    c = ConfigDict()
    c.model = ConfigDict(dict(
        vocab_size=384,        # >= the tokenizer's vocabulary (byte tokenizer: 259)
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,        # < num_heads: grouped-query attention
        head_dim=32,
        mlp_dim=384,           # SwiGLU hidden width F
        rope_theta=10_000.0,
        rope_scaling="none",   # none | linear | llama3 (Llama 3.1 long-context frequencies; see transformer.rope_frequencies)
        rope_factor=1.0,       # linear / llama3: the scaling factor
        rope_low_freq_factor=1.0,   # llama3 only
        rope_high_freq_factor=4.0,  # llama3 only
        rope_original_max_len=8192,  # llama3 only: the context length the frequencies were trained for
        norm_eps=1e-5,
        tie_embeddings=False,
        init_std=0.02,
        dtype="float32",       # compute dtype: float32 | bfloat16
        param_dtype="float32",
        remat="none",          # none | full | dots (save matmul outputs only)
        # layers per scan iteration: 1 keeps compile time flat in depth; num_layers unrolls the stack.
        # 0 (auto): unrolled on CPU up to 16 layers (XLA:CPU's backward through the layer loop copies
        # every layer's gradients and residuals: the unrolled DENSE_BENCH step is ~8% faster), else 1
        scan_unroll=0,
    ))
    c.moe = ConfigDict(dict(
        num_experts=0,         # 0: a dense model; E > 0: MoE FFNs of E experts (each of width model.mlp_dim)
        top_k=2,               # experts per token: 1 as in Switch, 2 as in GShard / Mixtral / BTX
        moe_every=1,           # every k-th layer is MoE (layers k-1, 2k-1, ...); the others stay dense
        dispatcher="einsum",   # einsum (GShard, GSPMD) | alltoall (expert parallel) | dropless | reference
        renormalize=True,      # top_k > 1: weights divided by their sum (an all-copies MoE then equals the dense FFN);
                               # top_k = 1 always gates by the router probability p (Switch; all copies: p * FFN)
        train_capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=256,        # tokens routed together (capacity is per group); min(group_size, seq_len) divides seq_len
        priority="token",      # drop order: token (top-1 choices first, then token order) | confidence (batch-prioritized)
        router_jitter=0.0,     # multiplicative noise on router inputs, training only (Switch uses 0.01)
        router_init_std=0.02,
        expert_dropout=0.0,    # dropout on expert hidden activations, training only (for MoE finetuning)
        load_balance_weight=0.01,  # Switch loss E * sum_e f_e p_e, averaged over MoE layers
        router_z_weight=0.001,     # mean log(Z)^2 of router logits, averaged over MoE layers
        # aux: the Switch loss over the batch (load_balance_weight) | sequence: the same loss per sequence,
        # averaged over sequences (DeepSeek-V3's sequence-wise loss; load_balance_weight) | bias: no balancing
        # loss; a per-expert bias added to the router probabilities for the top-k choice only (gates stay
        # unbiased), moved by bias_rate * sign(mean load - load) after every step (DeepSeek-V3)
        balance="aux",
        # bias step per train step, in router-probability units. DeepSeek-V3 uses 0.001 over ~10^5 steps; our
        # finetunes are ~10^2 steps and the bias moves at most rate x steps. On the demo finetune (43 steps)
        # 0.003 kept every layer's max/mean expert load at ~1.12; 0.001 was too slow (up to 1.34, like the aux
        # loss) and 0.01 wobbled more (up to 1.18): the step is also the size of the oscillation at balance
        bias_rate=0.003,
        # How dropless and alltoall run the expert FFNs: blocks (a loop over row blocks that skips
        # empty ones: fast on CPU) | native (ragged_dot for dropless, dense capacity buffers for
        # alltoall: what TPU/GPU want) | auto (blocks on CPU, native elsewhere)
        grouped_impl="auto",
        grouped_block=256,     # rows per block for grouped_impl=blocks (the demo MoE's step: 586 ms at 128, 485 at 256)
        # comma-separated expert indices that are never chosen (router logit -inf: the others' probabilities
        # renormalise), e.g. "2": the MoE without expert 2, checkpoint untouched (FlexOlmo's opt-out); "": none
        masked_experts="",
    ))
    c.mix = ConfigDict(dict(   # the checkpoint surgeon (python -m btx_jax.mix); the target is model + moe above
        experts="",            # comma-separated dense checkpoints (workdir, checkpoints/ or step dir): expert i <- source i
        seed="",               # the seed checkpoint: for seed_expert, 'seed' rules, upcycling and the branch check
        seed_expert=False,     # the seed's FFN becomes one more (the last) expert, as in the BTX paper
        copies=False,          # fill moe.num_experts by cycling through the FFN sources (sparse upcycling)
        copy_noise=0.0,        # std of noise added to every copy after the first, relative to the leaf's std
        # How copies of an FFN (sparse upcycling) start: copy (exact; copy_noise still applies when > 0, as
        # before), noise (copy_noise > 0 required), drop (Drop-Upcycling: in every copy, a random drop_ratio of
        # the intermediate dims, per layer and expert, re-drawn from normal(mean, std) of the original matrix)
        upcycle="copy",
        drop_ratio=0.5,
        # Granular experts (virtual-group upcycling, He et al. 2024): each FFN copy is split into g experts of
        # width F/g (model.mlp_dim = F/g, moe.num_experts = g x copies, moe.top_k = g x k); the router columns of
        # a copy's g experts are equal and the down kernels are scaled by g, so the MoE starts equal to the dense
        granularity=1,
        # Non-FFN params: ';'-separated 'regex=rule' on target paths (first match wins; unmatched: mean),
        # or a tuple of (regex, rule) pairs. Rules: mean | weighted:w1,w2,... | seed | source:<i>
        policy="",
        router_init="normal",  # normal | zeros (near-uniform: normal(router_std * 1e-3), so top-k ties do not all
                               # go to experts 0..k-1) | centroid (each column = mean hidden state of its domain)
        router_std=0.02,       # normal: the std; centroid: the norm of the mean column
        domains="",            # centroid: each expert source's data domain, comma-separated (default: sorted data.domains)
        centroid_batches=2,    # centroid: batches per domain (train split)
        output="",             # the output directory; must not exist
        noise_seed=0,
        memory_budget=0.0,     # GB of host memory for tiles in flight (0: 2x the largest source leaf or the largest tile)
    ))
    c.recipe = ConfigDict(dict(  # the whole BTX pipeline (python -m btx_jax.recipe)
        seed_steps=200,        # dense seed on the domain mixture
        # A pretrained seed instead of training one: a Hugging Face Llama-family directory or a btx_jax
        # checkpoint. The seed stage then imports it (model.* must describe it: configs/btx_from_hf.py).
        seed_from="",
        branch_steps=100,      # each domain expert, from the seed, on its domain only
        finetune_steps=100,    # the MoE on the mixture, from the surgeon's output
        branch_lr=1e-3, branch_warmup=10,
        finetune_lr=1e-3, finetune_warmup=10,
        # comma-separated; all run by default. Baselines: dense (the seed trained on for BTX's compute),
        # btm (ensemble and averages of the branches), upcycle (MoE of seed copies, BTX's compute),
        # drop_upcycle (Drop-Upcycling: seed copies with mix.drop_ratio of each re-initialized, BTX's compute).
        baselines="dense,btm,upcycle",
        # BTX variants, each a finetune: top1, no_load_balance, random_router (normal init instead of centroid),
        # bias_balance / sequence_balance (moe.balance=bias / sequence)
        variants="top1,no_load_balance,random_router",
        parallel_branches=False,  # train the branches as parallel processes (one per domain)
        seeds=1,               # trials of the whole comparison (train.seed and data.seed + i); 3+ for seed intervals
        eval_tokens=100_000,   # scored targets per domain, a fixed prefix of each held-out split (0: the whole split)
        calibration_tokens=20_000,  # training-split tokens per domain that fit the BTM posterior-average weights
        bootstrap=1000,        # paired bootstrap replicates (documents x trials) for the 95% intervals
        # BTX scored again with each expert masked (moe.masked_experts; E more evaluations): the report's
        # "Opting out one expert" table, each domain's perplexity change with a paired interval
        opt_out=True,
        rerun_from="",         # comma-separated stages to re-run with everything downstream, e.g. finetune, branch/code
        # > 0: the seed/branch/finetune steps above are a *budget* (their FLOPs), re-split so that the seed
        # gets this share and the branches and finetune the rest in their proportion (btx_jax/sweep.py)
        seed_share=0.0,
        sweep="",              # e.g. seed_share:0.3,0.5,0.7,0.9: the comparison at each seed share (btx_jax/sweep.py)
        # Running at scale (python -m btx_jax.recipe --plan; launch/btx_driver.py):
        target="",             # hardware the stages run on, a name in btx_jax/hardware.py (e.g. v5p-128, 8xH100); "": this host
        assumed_mfu=0.5,       # --plan's wall-clock estimate: model FLOP/s / the target's peak
        moe_mesh="",           # mesh of the MoE stages, e.g. "expert=4,fsdp=-1"; "": the mesh section (all stages)
    ))
    # The expert lifecycle after BTX (btx_jax/mix/lifecycle.py, the extend/* stages): a domain of
    # data.eval_domains, which no other stage trains on, gets its own expert: extend/branch (the seed trained
    # on it like a branch, for extend_branch_steps; 0: recipe.branch_steps), extend/add (its FFN appended to the finetuned BTX as expert E, router column =
    # the domain's centroid), extend/finetune (extend_steps on the training mixture plus the new domain,
    # training only the params that extend_trainable matches, a train.trainable regex; "": all). "": off
    c.recipe.update(extend_domain="", extend_branch_steps=0, extend_steps=50, extend_trainable="router")
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))  # -1: the remaining devices
    c.data = ConfigDict(dict(
        data_dir="data/tfds",  # where TFDS datasets are built / read (ArrayRecord)
        # domain name -> source: "demo:<code|math|prose|docs>", "files:<glob>[,<glob>...]"
        # (.txt: one document per file; .jsonl: one per line, field "text"),
        # or "tfds:<name>[/<config>][:<version>]" (an ArrayRecord TFDS dataset with a "text" feature).
        domains=ConfigDict(dict(code="demo:code", math="demo:math", prose="demo:prose")),
        weights=ConfigDict(),  # domain -> mixture weight; empty = uniform
        eval_domains=ConfigDict(),  # extra held-out-only domains, same source syntax
        build_if_missing=True,  # build demo/files datasets when absent from data_dir
        tokenizer="byte",      # byte | sentencepiece | hf:<dir> (a Hugging Face checkpoint's tokenizer and BOS/EOS)
        spm_model="",          # path to a SentencePiece .model when tokenizer=sentencepiece
        seq_len=256,
        batch_size=16,         # global batch, in packed rows
        max_chunks_per_doc=64,  # longer documents are cut into seq_len chunks, the rest dropped
        packing_bins=0,        # 0: batch_size
        # The global batch is assembled from this many independent streams (documents i::shards, each
        # packed into batch_size / shards rows), split among the processes. Fixed, the data is the same
        # on any number of processes that divides it (a run resumes on another host count unchanged);
        # 0: one stream per process
        shards=0,
        seed=0,
    ))
    c.optim = ConfigDict(dict(
        lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        z_loss=0.0,            # coefficient of log(Z)^2 on the output logits
    ))
    c.train = ConfigDict(dict(
        steps=600, seed=0,
        log_every=20, eval_every=200, eval_batches=4,
        checkpoint_every=200, keep_checkpoints=3,
        init_from="",          # checkpoint dir (or step dir) whose params start this run, fresh optimizer
        peak_flops=0.0,        # FLOP/s of the whole job for MFU; 0: look up / measure
        grad_accum=1,          # microbatches per step (gradients summed over them): data.batch_size rows per step,
                               # batch_size / grad_accum in memory at once
        # a regex searched in each param path (e.g. "router" or "moe/router/kernel"): only matching params are
        # trained (the others get no update, no Adam state, no weight decay; grad_norm covers the trained ones);
        # "": every param
        trainable="",
    ))
    return c


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid fields: {', '.join(sorted(options))}"


def check_fields(config: ConfigDict, schema: ConfigDict | None = None, prefix: str = "") -> None:
    """Every field in `config` must exist in the schema (catches typos in config files)."""
    schema = base_config() if schema is None else schema
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(path, "unknown field", _suggest(key, schema.keys()))
        if isinstance(value, ConfigDict) and path not in _FREE_FORM:
            check_fields(value, schema[key], path + ".")


def _positive(config: ConfigDict, *fields: str) -> None:
    for field in fields:
        section, key = field.split(".")
        value = config[section][key]
        if not value > 0:
            raise ConfigError(field, f"must be > 0, got {value!r}", f"set --config.{field} to a positive value")


def _check_model(m: ConfigDict) -> None:
    _positive(ConfigDict({"model": m}), "model.vocab_size", "model.d_model", "model.num_layers",
              "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.mlp_dim")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"{m.num_kv_heads} does not divide num_heads={m.num_heads}",
                          "choose num_kv_heads among the divisors of num_heads")
    if m.head_dim % 2:
        raise ConfigError("model.head_dim", f"must be even for RoPE, got {m.head_dim}", "use an even head_dim")
    for field in ("dtype", "param_dtype"):
        if m[field] not in DTYPES:
            raise ConfigError(f"model.{field}", f"unknown dtype {m[field]!r}", f"use one of {DTYPES}")
    if not 0 <= m.scan_unroll <= m.num_layers:
        raise ConfigError("model.scan_unroll", f"must be in [0, num_layers={m.num_layers}], got {m.scan_unroll}",
                          "use 1 (a loop over layers) up to num_layers (fully unrolled)")
    if m.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError("model.rope_scaling", f"unknown scaling {m.rope_scaling!r}", f"use one of {ROPE_SCALINGS}")
    if m.rope_scaling != "none" and not m.rope_factor > 0:
        raise ConfigError("model.rope_factor", f"must be > 0, got {m.rope_factor}", "use e.g. 8.0 (Llama 3.1)")
    if m.rope_scaling == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError("model.rope_high_freq_factor", f"must exceed rope_low_freq_factor={m.rope_low_freq_factor}",
                          "use Llama 3.1's 4.0 and 1.0")
    if m.remat not in REMAT_POLICIES:
        raise ConfigError("model.remat", f"unknown policy {m.remat!r}", f"use one of {REMAT_POLICIES}")


def _check_moe(e: ConfigDict, m: ConfigDict, seq_len: int) -> None:
    if e.num_experts == 0:
        return
    if e.num_experts < 0:
        raise ConfigError("moe.num_experts", f"must be >= 0, got {e.num_experts}", "use 0 for a dense model or E > 0")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError("moe.top_k", f"must be in [1, num_experts={e.num_experts}], got {e.top_k}",
                          "route each token to at most num_experts experts (1 or 2 are usual)")
    for field in ("train_capacity_factor", "eval_capacity_factor"):
        if not e[field] > 0:
            raise ConfigError(f"moe.{field}", f"must be > 0, got {e[field]}", "use e.g. 1.25 (train) and 2.0 (eval)")
    if e.dispatcher not in DISPATCHERS:
        raise ConfigError("moe.dispatcher", f"unknown dispatcher {e.dispatcher!r}", f"use one of {DISPATCHERS}")
    if e.priority not in PRIORITIES:
        raise ConfigError("moe.priority", f"unknown priority {e.priority!r}", f"use one of {PRIORITIES}")
    if e.grouped_impl not in GROUPED_IMPLS:
        raise ConfigError("moe.grouped_impl", f"unknown implementation {e.grouped_impl!r}", f"use one of {GROUPED_IMPLS}")
    if e.moe_every < 1 or m.num_layers % e.moe_every:
        raise ConfigError("moe.moe_every", f"{e.moe_every} does not divide model.num_layers={m.num_layers}",
                          "use 1 (every layer) or a divisor of num_layers")
    if e.group_size < 1 or seq_len % min(e.group_size, seq_len):
        raise ConfigError("moe.group_size", f"{e.group_size} does not divide data.seq_len={seq_len}",
                          "use a divisor of seq_len (a value >= seq_len routes each sequence as one group)")
    for field in ("router_jitter", "expert_dropout"):
        if not 0 <= e[field] < 1:
            raise ConfigError(f"moe.{field}", f"must be in [0, 1), got {e[field]}", "use e.g. 0.0 or 0.1")
    if e.dispatcher == "dropless" and e.expert_dropout > 0:
        raise ConfigError("moe.expert_dropout", "is not implemented for the dropless dispatcher",
                          "set moe.expert_dropout=0 or use the einsum or alltoall dispatcher")
    if e.grouped_block < 1:
        raise ConfigError("moe.grouped_block", f"must be >= 1, got {e.grouped_block}", "use e.g. 64")
    if e.balance not in BALANCES:
        raise ConfigError("moe.balance", f"unknown balancing {e.balance!r}", f"use one of {BALANCES}: aux (Switch "
                          "loss), sequence (per-sequence loss) or bias (auxiliary-loss-free selection bias)")
    if not 0 < e.bias_rate < 1:
        raise ConfigError("moe.bias_rate", f"must be in (0, 1), got {e.bias_rate}",
                          "use e.g. 0.003 (the bias is in router-probability units; DeepSeek-V3 uses 0.001)")
    _check_masked(e)


def _check_masked(e: ConfigDict) -> None:
    """moe.masked_experts: distinct indices in [0, E), and at least top_k experts left to route to."""
    items = [item.strip() for item in str(e.get("masked_experts", "")).split(",") if item.strip()]
    if not all(item.isdigit() for item in items):
        raise ConfigError("moe.masked_experts", f"expected comma-separated expert indices, got {e.masked_experts!r}",
                          "use e.g. '2' or '0,3' (indices from 0 to num_experts - 1), or '' to mask none")
    masked = [int(item) for item in items]
    bad = [i for i in masked if i >= e.num_experts]
    if bad:
        raise ConfigError("moe.masked_experts", f"experts {bad} do not exist (num_experts={e.num_experts})",
                          f"use indices from 0 to {e.num_experts - 1}")
    if len(set(masked)) != len(masked):
        raise ConfigError("moe.masked_experts", f"an expert is named twice in {e.masked_experts!r}",
                          "name each masked expert once")
    if e.num_experts - len(masked) < e.top_k:
        raise ConfigError("moe.masked_experts", f"masking {len(masked)} of {e.num_experts} experts leaves fewer than "
                          f"top_k={e.top_k}", "mask fewer experts, or lower moe.top_k")


def _check_data(d: ConfigDict, check_paths: bool = True) -> None:
    if not d.domains:
        raise ConfigError("data.domains", "no training domains", "name at least one, e.g. code='demo:code'")
    for name, spec in list(d.domains.items()) + list(d.eval_domains.items()):
        if not isinstance(spec, str) or spec.split(":", 1)[0] not in ("demo", "files", "tfds") or ":" not in spec:
            raise ConfigError(f"data.domains.{name}", f"bad source {spec!r}",
                              "use 'demo:<code|math|prose|docs>', 'files:<glob>' or 'tfds:<name>'")
    for name, weight in d.weights.items():
        if name not in d.domains:
            raise ConfigError(f"data.weights.{name}", "weight for a domain that is not in data.domains",
                              _suggest(name, d.domains.keys()))
        if not weight >= 0:
            raise ConfigError(f"data.weights.{name}", f"must be >= 0, got {weight}", "use a non-negative weight")
    if d.weights and sum(d.weights.get(n, 0.0) for n in d.domains) <= 0:
        raise ConfigError("data.weights", "all mixture weights are zero", "give at least one domain weight > 0")
    if d.tokenizer.startswith("hf:"):
        if check_paths:
            directory = _path("data.tokenizer", d.tokenizer[3:])
            if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
                raise ConfigError("data.tokenizer", f"{str(directory)!r} has no tokenizer.json or tokenizer.model",
                                  "point hf:<dir> to a Hugging Face checkpoint directory that ships its tokenizer")
    elif d.tokenizer not in TOKENIZERS:
        raise ConfigError("data.tokenizer", f"unknown tokenizer {d.tokenizer!r}", f"use one of {TOKENIZERS} or hf:<dir>")
    if check_paths and d.tokenizer == "sentencepiece" and not _path("data.spm_model", d.spm_model).is_file():
        raise ConfigError("data.spm_model", f"SentencePiece model file not found: {d.spm_model!r}",
                          "train one with `python -m btx_jax.data.train_tokenizer` or point to an existing .model")
    _positive(ConfigDict({"data": d}), "data.seq_len", "data.batch_size", "data.max_chunks_per_doc")


def _check_optim_train(c: ConfigDict, check_paths: bool = True) -> None:
    _positive(c, "optim.lr", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "train.keep_checkpoints")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {c.optim.min_lr_ratio}", "use e.g. 0.1")
    if c.optim.warmup_steps < 0 or c.optim.warmup_steps >= c.train.steps:
        raise ConfigError("optim.warmup_steps", f"{c.optim.warmup_steps} is not in [0, train.steps={c.train.steps})",
                          "use fewer warmup steps than training steps")
    accum = c.train.grad_accum
    if not isinstance(accum, int) or accum < 1 or c.data.batch_size % accum:
        raise ConfigError("train.grad_accum", f"must be an integer >= 1 dividing data.batch_size={c.data.batch_size}, "
                          f"got {accum!r}", "use 1 (no accumulation) or a divisor of data.batch_size")
    try:
        re.compile(c.train.get("trainable", ""))
    except re.error as error:
        raise ConfigError("train.trainable", f"not a regular expression ({error}): {c.train.trainable!r}",
                          "use a Python regex searched in param paths, e.g. 'router' or 'moe/router/kernel'") from None
    if check_paths and c.train.init_from and not _path("train.init_from", c.train.init_from).exists():
        raise ConfigError("train.init_from", f"checkpoint not found: {c.train.init_from!r}",
                          "point it to a workdir's checkpoints/ directory or one of its step directories")


def _path(field: str, value: str):
    """A path field (local, or a URL such as gs://...) as an etils.epath.Path."""
    from btx_jax import paths

    try:
        return paths.resolve(value)
    except ValueError as e:
        raise ConfigError(field, str(e), "use a local path or a gs:// URL") from None


def validate(config: ConfigDict, check_paths: bool = True) -> ConfigDict:
    """Checks every field once; returns the config. Mesh/device checks live in sharding.py.
    `check_paths=False` skips the checks that files exist (a plan made where the run's files are not)."""
    check_fields(config)
    _check_model(config.model)
    _check_data(config.data, check_paths)
    _check_moe(config.moe, config.model, config.data.seq_len)
    _check_optim_train(config, check_paths)
    _check_mix(config.mix)
    return config


def _check_mix(x: ConfigDict) -> None:
    upcycle = x.get("upcycle", "copy")
    if upcycle not in UPCYCLES:
        raise ConfigError("mix.upcycle", f"unknown upcycling {upcycle!r}", f"use one of {UPCYCLES}")
    if upcycle == "noise" and not x.copy_noise > 0:
        raise ConfigError("mix.copy_noise", f"must be > 0 with mix.upcycle=noise, got {x.copy_noise}",
                          "set e.g. --config.mix.copy_noise=0.01, or use mix.upcycle=copy")
    if upcycle == "drop" and x.copy_noise:
        raise ConfigError("mix.copy_noise", f"must be 0 with mix.upcycle=drop, got {x.copy_noise}",
                          "set --config.mix.copy_noise=0 (drop re-initializes part of each copy instead)")
    g = x.get("granularity", 1)
    if not isinstance(g, int) or g < 1:
        raise ConfigError("mix.granularity", f"must be an integer >= 1, got {g!r}", "use 1 (whole FFNs) or e.g. 2")
    if g > 1 and upcycle == "drop":
        raise ConfigError("mix.granularity", f"{g} is not implemented with mix.upcycle=drop",
                          "use mix.granularity=1 with drop, or mix.upcycle=copy/noise")
    if g > 1 and x.router_init == "centroid":
        raise ConfigError("mix.granularity", f"{g} is not implemented with mix.router_init=centroid",
                          "use mix.router_init=normal or zeros")
    if not 0.0 <= x.get("drop_ratio", 0.5) <= 1.0:
        raise ConfigError("mix.drop_ratio", f"must be in [0, 1], got {x.drop_ratio}",
                          "use e.g. 0.5 (Drop-Upcycling's default)")


def domain_weights(data: ConfigDict) -> dict[str, float]:
    """Normalized mixture weights per training domain (uniform when none are given)."""
    names = sorted(data.domains.keys())
    raw = {n: float(data.weights.get(n, 0.0 if data.weights else 1.0)) for n in names}
    total = math.fsum(raw.values())
    return {n: w / total for n, w in raw.items()}


def load_config(spec: str) -> ConfigDict:
    """``path/to/config.py[:variant]`` -> the file's ``get_config(variant)`` (as --config does)."""
    import importlib.util

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):  # local: a Python config file
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"btx_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)

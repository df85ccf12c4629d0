"""The BTX paper's run (Sukhbaatar et al. 2024, arXiv 2403.07816): Llama-2 7B -> math, code and
Wikipedia experts -> a 4-expert top-2 MoE (the seed's FFN kept as the fourth expert) -> finetune.

  python -m btx_jax.recipe --config configs/btx_llama2_7b.py:v5p-128 --workdir gs://BUCKET/runs/btx --plan
  launch/btx.sh --backend=tpu --config=configs/btx_llama2_7b.py:v5p-128 --workdir=gs://BUCKET/runs/btx  # a slice per stage

Placeholders to replace before a run: ``SEED`` (a Hugging Face Llama-2-7b directory: the seed
and its tokenizer) and the ``tfds:btx_*`` datasets (ArrayRecord TFDS builds with a ``text``
feature, in ``data.data_dir``): the paper used Llemma's math mixture, CodeLlama's code mixture
and Wikipedia from June-August 2022.

Paper numbers (section 4.1, table 3): batch 4M tokens (1024 x 4096), AdamW (wd 0.1), lr 1e-4,
100 warmup steps, cosine to 10%. Branches: math 48k steps (201B tokens), code 50k (210B),
Wikipedia 42B (10k steps); the recipe gives every branch the same steps, so each gets their
mean, 36k steps (151B tokens; 453B in all, as in the paper). MoE finetune: 80B tokens = 19,073
steps, top-2, load balancing 0.01, no z-loss. BTX in all: 533B tokens, 926 A100-days, 7.8 days.

Expected wall-clock at recipe.assumed_mfu = 0.5, branches in parallel (each on its own slice),
then the finetune. FLOPs per token (btx_jax/flops.py: 6 x active matmul params + attention):
dense 42.9 G (6.61B), MoE top-2 68.8 G (10.94B). A branch is 151B tokens = 6.47e21 FLOPs, the
finetune 80B tokens = 5.51e21. On v5p-128 (64 x 459 TFLOP/s x 0.5 = 1.47e16 FLOP/s): 5.1 + 4.3
= 9.4 days (19.6 with the branches one after another; 11.4 if the branches kept the paper's own
lengths, the code branch's 50k steps taking 7.1 days). v4-128: 8.5 + 7.2 = 15.8 days. 8xH100:
18.9 + 16.1 = 35 days (45 s per dense step, 73 s per MoE step). Cross-check: all of BTX is
2.49e22 FLOPs, which is the paper's 926 A100-days at the A100's 312 TFLOP/s peak (within 0.2%).

Differences from the paper: the finetune mixture lacks the Llama-2 pretraining data (19% of the
paper's mixture; it is not a branch domain here), so the weights below are the paper's other
three renormalized (30.16 / 40.31 / 10.30); the router starts from ``normal`` (the paper says
only that it is new); the load-balancing loss counts routing choices (Switch) where the paper
averages gate values. Baselines: only BTM (it reuses the branches: evaluation only); ``dense``
and ``upcycle`` each cost about BTX's whole budget again (add them with
``--config.recipe.baselines=btm,dense,upcycle``), the variants a finetune each.

Variants: the hardware (btx_jax/hardware.py). Dense stages on fsdp over every chip, MoE stages
on ``recipe.moe_mesh``; tests/test_scale.py plans each stage's memory per device (printed) and
checks it stays under 90% of HBM (plans: v5p 69%, v4 76%, H100 76%).
  v5p-128 (the default): 64 chips, 95 GB; remat dots, 4 microbatches of 256 rows (4 per chip).
  v4-128: 64 chips, 32 GiB; remat full, 8 microbatches (2 rows per chip).
  8xH100: 8 GPUs, 80 GB; remat full, 128 microbatches (1 row per GPU); MoE params, Adam state and
    gradients take 49 GB per GPU, so set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (jax takes 75% by default).
"""
import os

from ml_collections import ConfigDict

from btx_jax.config import load_config

SEED = "gs://BUCKET/llama-2-7b-hf"  # placeholder: a Hugging Face Llama-2-7b checkpoint directory
BATCH_ROWS, SEQ_LEN = 1024, 4096  # 4M tokens per step
BRANCH_STEPS = (48_000 + 50_000 + 10_000) // 3  # math, code, Wikipedia: their mean
FINETUNE_STEPS = 80_000_000_000 // (BATCH_ROWS * SEQ_LEN)  # 80B tokens

# target -> (MoE mesh, remat, grad_accum); dense stages use fsdp over every chip. See the module docstring.
TARGETS = {
    "v5p-128": ("expert=4,fsdp=-1", "dots", 4),
    "v4-128": ("expert=4,fsdp=-1", "full", 8),
    "8xH100": ("fsdp=-1", "full", 128),
}


def get_config(variant: str | None = None):
    variant = variant or "v5p-128"
    if variant not in TARGETS:
        raise ValueError(f"configs/btx_llama2_7b.py has no variant {variant!r}; use one of {', '.join(TARGETS)}")
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama2_7b.py"))
    c.data.update(tokenizer=f"hf:{SEED}", spm_model="", seq_len=SEQ_LEN, batch_size=BATCH_ROWS,
                  data_dir="gs://BUCKET/tfds", build_if_missing=False)
    c.data.domains = ConfigDict({"math": "tfds:btx_math", "code": "tfds:btx_code", "wikipedia": "tfds:btx_wikipedia"})
    c.data.weights = ConfigDict({"math": 30.16, "code": 40.31, "wikipedia": 10.30})  # the paper's, less Llama-2 data
    c.moe.update(num_experts=4, top_k=2, dispatcher="dropless", grouped_impl="native",
                 load_balance_weight=0.01, router_z_weight=0.0)
    c.mix.update(seed_expert=True, router_init="normal")
    c.optim.update(lr=1e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, z_loss=0.0)
    c.train.update(steps=FINETUNE_STEPS, checkpoint_every=1000, keep_checkpoints=2)
    c.recipe.update(seed_from=SEED, seed_share=0.0, branch_steps=BRANCH_STEPS, finetune_steps=FINETUNE_STEPS,
                    branch_lr=1e-4, branch_warmup=100, finetune_lr=1e-4, finetune_warmup=100,
                    baselines="btm", variants="", parallel_branches=False,
                    eval_tokens=2_000_000, calibration_tokens=200_000)
    moe_mesh, remat, accum = TARGETS[variant]
    c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    c.model.remat = remat
    c.train.grad_accum = accum
    c.recipe.update(target=variant, moe_mesh=moe_mesh, assumed_mfu=0.5)
    return c

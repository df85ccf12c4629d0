"""The demo MoE: the demo seed's shape with every FFN an MoE of 4 experts, top-2.

  python -m btx_jax.train --config configs/demo_moe.py --workdir runs/moe

Trained from scratch this is a plain MoE baseline; in BTX it is the finetuning stage, started
from the surgeon's output with ``--config.train.init_from=<mixed checkpoint>`` (4 experts =
3 domain experts + the seed's FFN). Active FLOPs per token are those of a dense model with
FFN width 2 x mlp_dim. Variants: ``:tiny`` (a seconds-long smoke run, used by the tests).
"""
import os

from btx_jax.config import load_config


def get_config(variant: str | None = None):
    dense = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_dense.py")
    c = load_config(dense + (f":{variant}" if variant else ""))
    c.moe.update(num_experts=4, top_k=2, dispatcher="alltoall", train_capacity_factor=1.25,
                 eval_capacity_factor=2.0, group_size=256, load_balance_weight=0.01, router_z_weight=0.001)
    if variant == "tiny":
        # ~32 rows per expert and device: small CPU blocks keep grouped_ffn's remainder branches few (compile time)
        c.moe.update(group_size=64, grouped_block=32)
    return c

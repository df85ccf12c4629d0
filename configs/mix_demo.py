"""The demo surgeon: three domain experts (code, math, prose) plus the seed's own FFN -> a 4-expert MoE.

  python -m btx_jax.mix --config configs/mix_demo.py [--dry-run]
  python -m btx_jax.train --config configs/demo_moe.py --workdir runs/btx/finetune \\
      --config.train.init_from=runs/btx/mix

The target model is configs/demo_moe.py (its model and moe sections must match the sources);
attention, norms and embeddings are averaged over the three experts, the router starts from
the experts' domain centroids. Paths follow the recipe's layout under runs/btx/; they may be URLs
(gs://...). Several processes can write the output together: add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each.
"""
import os

from btx_jax.config import load_config


def get_config(variant: str | None = None):
    moe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_moe.py")
    c = load_config(moe + (f":{variant}" if variant else ""))
    c.mix.update(
        experts="runs/btx/branch/code,runs/btx/branch/math,runs/btx/branch/prose",
        domains="code,math,prose",
        seed="runs/btx/seed",
        seed_expert=True,        # 3 experts + the seed's FFN = moe.num_experts (4)
        policy="",               # everything but the FFNs: the mean of the three experts
        router_init="centroid",
        output="runs/btx/mix",
        memory_budget=0.0,       # GB of tiles in flight; 0: 2x the largest source leaf, or the largest tile
    )
    return c

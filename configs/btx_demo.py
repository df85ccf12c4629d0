"""The BTX demo: seed -> code / math / prose experts -> 4-expert MoE -> finetune, with baselines.

  python -m btx_jax.recipe --config configs/btx_demo.py --workdir runs/btx

Model: the demo seed's shape (configs/demo_dense.py); the MoE has the three domain experts
plus the seed's FFN (top-2, centroid router). Baselines and variants, all run by default:
compute-matched dense, BTM (ensemble, averages), sparse upcycling, top-1, no load balancing,
random router. Every model is also evaluated on ``docs`` (the Python documentation's help
topics), a domain no stage trains on. Variant ``:tiny`` runs every stage in about a minute (used by the tests).
"""
import os

from ml_collections import ConfigDict

from btx_jax.config import load_config


def get_config(variant: str | None = None):
    here = os.path.dirname(os.path.abspath(__file__))
    c = load_config(os.path.join(here, "demo_moe.py") + (f":{variant}" if variant else ""))
    # dropless: a packed row holds one domain, so capacity would drop exactly the tokens that the
    # domain's own expert should win; the MoE stages train without drops (evaluation never drops)
    c.moe.update(num_experts=4, top_k=2, dispatcher="dropless")
    # never trained on: out-of-domain perplexity (Python documentation prose)
    c.data.eval_domains = ConfigDict({"docs": "demo:docs"})
    c.mix.update(seed_expert=True, router_init="centroid", policy="", centroid_batches=2)
    c.train.update(log_every=25, eval_batches=3, checkpoint_every=100)
    # the budget: the FLOPs of 200 seed + 3 x 100 branch + 100 finetune steps; the seed gets 70% of it
    # (463 / 43 / 43 steps), the regime of the BTX paper, where the seed holds most of the compute
    # (Llama-2 7B's 2T tokens against ~0.5T for branches and finetune); recipe.sweep varies the share
    c.recipe.update(seed_steps=200, branch_steps=100, finetune_steps=100, seed_share=0.7)
    if variant == "tiny":
        c.train.update(log_every=2, eval_batches=1, checkpoint_every=4)
        c.recipe.update(seed_steps=6, branch_steps=3, finetune_steps=3, branch_warmup=1, finetune_warmup=1,
                        seed_share=0.0)
        c.mix.centroid_batches = 1
        c.recipe.update(eval_tokens=1500, calibration_tokens=500, bootstrap=200)
    return c

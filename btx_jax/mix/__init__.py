"""``python -m btx_jax.mix --config configs/mix_demo.py``: the checkpoint surgeon.

Merges N dense expert checkpoints (branches of one seed, written by ``btx_jax.train``) into
one MoE checkpoint that ``btx_jax.train --config.train.init_from=<output>`` finetunes:

- the FFN of source i becomes expert i of every MoE layer (``layers/mlp/*`` [L, D, F] ->
  ``layers/moe/experts/*`` [L, E, D, F]); optionally the seed's FFN as one more expert, or E
  experts filled by cycling through fewer sources (sparse upcycling), with symmetry-breaking noise;
- every other parameter is merged by the first matching (regex -> rule) of ``mix.policy``:
  mean (default), weighted:w1,...,wN, seed, source:i;
- the router is new: normal(std), zeros (near-uniform: normal(std * 1e-3)), or centroid (each
  expert's column is the mean hidden state, at that layer, of its own domain's tokens under the
  merged model).

It streams: every leaf is cut into tiles of whole source chunks, made and written while their
working memory fits ``mix.memory_budget``, so host memory does not grow with the number of
experts or layers (centroid init also loads the merged model, sharded, for its forward passes).
Several processes (``--coordinator_address``/``--num_processes``/``--process_id``) write one
checkpoint together, each its share of the tiles. Sources and output may be URLs (``gs://...``).
Everything that can be checked is checked before anything is written; the output is written under
a temporary name and renamed into place only when complete, with ``manifest.json``.

Modules: ``plan`` (sources, policy, leaf plans, checks), ``tiles`` (cutting leaves into tiles),
``stream`` (reading, merging, writing tiles), ``router_init``, ``surgeon`` (``run``), ``lifecycle`` (adding and
removing an expert of an MoE: ``python -m btx_jax.mix add|remove``), ``__main__`` (the CLI).
"""
import importlib

# Imported on first use, so that ``python -m btx_jax.mix`` starts (and ``__main__`` can set up the
# process) before jax is imported.
_EXPORTS = {"LeafPlan": "plan", "MixError": "plan", "Source": "plan", "make_plan": "plan", "open_source": "plan",
            "parse_policy": "plan", "ZEROS_ROUTER_SCALE": "router_init", "centroid_router": "router_init",
            "initial_router": "router_init", "run": "surgeon", "add_expert": "lifecycle",
            "remove_expert": "lifecycle"}
__all__ = ["LeafPlan", "MixError", "Source", "ZEROS_ROUTER_SCALE", "centroid_router", "initial_router",
           "make_plan", "open_source", "parse_policy", "run", "add_expert", "remove_expert"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"btx_jax.mix.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'btx_jax.mix' has no attribute {name!r}")

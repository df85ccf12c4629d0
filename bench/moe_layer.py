"""MoE layer and MoE train step against the dense equivalent of equal active FLOPs, as ratios.

  .venv/bin/python bench/moe_layer.py [--repeats 5] [--experts 4,8,16,32] [--skip_train_step]

1. MOE_BENCH layer: forward+backward (grads w.r.t. input and all weights) of an MoE FFN with
   E=8 experts of width 1536, top-2, capacity factor 1.25, on 2048 tokens of width 512, for
   each dispatcher, / the same for a dense SwiGLU FFN of width 3072 (same active FLOPs).
2. MOE_SCALING: the same ratio for E in 4, 8, 16, 32, and each dispatcher's E=32 / E=4 time.
3. Train step: the MOE_BENCH model (DENSE_BENCH with MoE FFNs) / the DENSE_EQUIV model, and both
   against HF MixtralForCausalLM / LlamaForCausalLM in torch (bench/peers.py) when its venv builds.

Timings are interleaved (one call of each variant per round, median over rounds) so that
load from other processes hits every variant alike. Goals (BENCH.md): every dispatcher
<= 1.1x the dense equivalent and <= 1.1x from E=4 to E=32; MaxText's capacity path is
1.20-1.26x, its dropless (ragged_dot) path 5.8x; HF Mixtral's train step 1.19x.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # before jax is imported: both sides run with the CLI's host memory setting
    from btx_jax import host_memory

    host_memory.reexec_with_huge_pages(keep_freed=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import dense_bench_config, train_step_runner  # noqa: E402
from timing import host_memory_line  # noqa: E402
from btx_jax import sharding  # noqa: E402
from btx_jax.models.moe import MoE, MoEConfig  # noqa: E402
from btx_jax.models.transformer import MLP, TransformerConfig  # noqa: E402

D, F, K, TOKENS, SEQ = 512, 1536, 2, 2048, 512
DISPATCHERS = ("einsum", "alltoall", "dropless")


def layer_runner(make_module, moe: bool):
    """A blocking fwd+bwd call of one FFN layer on TOKENS tokens (grads w.r.t. x and weights)."""
    x = jax.random.normal(jax.random.key(0), (TOKENS // SEQ, SEQ, D), jnp.float32)
    seg = jnp.ones(x.shape[:2], jnp.int32)
    cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    graphdef, state = nnx.split(make_module())

    def loss(state, x):
        module = nnx.merge(graphdef, state)
        y = module(x, seg, train=True)[0] if moe else module(x)
        return jnp.sum(y * cotangent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def run():
        jax.block_until_ready(step(state, x))
    return run


def interleaved(runners: dict, rounds: int, first: dict | None = None) -> dict:
    """Median seconds per call of each runner, one call of each per round after a warm-up call (its
    seconds, tracing and compiling included, go to `first` when given)."""
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        if first is not None:
            first[name] = time.perf_counter() - start
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def moe_module(dispatcher: str, experts: int, group_size: int, block: int = MoEConfig.grouped_block):
    cfg = MoEConfig(num_experts=experts, top_k=K, dispatcher=dispatcher, train_capacity_factor=1.25,
                    group_size=group_size, grouped_block=block)
    return lambda: MoE(cfg, D, F, std=0.02, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0))


def dense_module():
    cfg = TransformerConfig(vocab_size=8, d_model=D, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=64,
                            mlp_dim=K * F)
    return lambda: MLP(cfg, nnx.Rngs(0))


def bench_layers(experts_list, repeats: int, group_size: int) -> None:
    print(f"== MoE layer fwd+bwd / dense SwiGLU FFN of width {K * F} ({TOKENS} tokens, d {D}, top-{K}, "
          f"cf 1.25, group {group_size}; dropless: no capacity)")
    by_experts = {}
    for experts in experts_list:
        runners = {"dense": layer_runner(dense_module(), moe=False)}
        runners |= {d: layer_runner(moe_module(d, experts, group_size), moe=True) for d in DISPATCHERS}
        first = {}
        times = interleaved(runners, repeats, first)
        by_experts[experts] = times
        print(f"E={experts:>2}: dense {times['dense'] * 1e3:7.1f} ms | " + " | ".join(
            f"{d} {times[d] * 1e3:7.1f} ms = {times[d] / times['dense']:.2f}x" for d in DISPATCHERS), flush=True)
        print("      first call (trace + compile + run): " + " | ".join(f"{name} {t:.1f} s" for name, t in first.items()),
              flush=True)
    if len(experts_list) > 1:
        lo, hi = experts_list[0], experts_list[-1]
        print(f"scaling E={hi} / E={lo} (each normalized by its own dense run): " + " | ".join(
            f"{d} {(by_experts[hi][d] / by_experts[hi]['dense']) / (by_experts[lo][d] / by_experts[lo]['dense']):.2f}x"
            for d in DISPATCHERS))


def bench_train_step(repeats: int, group_size: int, dispatchers, peers: bool = True) -> None:
    print("== train step: MOE_BENCH (E=8, F=1536, top-2) / DENSE_EQUIV (F=3072)")
    runners = {"dense_equiv": train_step_runner(dense_bench_config(mlp_dim=K * F))}
    for d in dispatchers:
        config = dense_bench_config(mlp_dim=F)
        config.moe.update(num_experts=8, top_k=K, dispatcher=d, train_capacity_factor=1.25, group_size=group_size)
        runners[d] = train_step_runner(config)
    times = interleaved(runners, repeats)
    print(f"dense_equiv {times['dense_equiv'] * 1e3:.0f} ms | " + " | ".join(
        f"{d} {times[d] * 1e3:.0f} ms = {times[d] / times['dense_equiv']:.2f}x" for d in dispatchers))
    if peers:
        from peers import torch_figures

        torch = torch_figures(("DENSE_EQUIV", "MOE_BENCH"), repeats)
        if torch is None:
            print("(no torch venv: no HF Mixtral figures)")
            return
        print(f"HF Mixtral (torch {torch['torch']}, grouped_mm): MOE_BENCH {torch['MOE_BENCH'] * 1e3:.0f} ms = "
              f"{torch['MOE_BENCH'] / torch['DENSE_EQUIV']:.2f}x its DENSE_EQUIV ({torch['DENSE_EQUIV'] * 1e3:.0f} ms)")
        print("btx_jax / torch, MOE_BENCH step: " + " | ".join(
            f"{d} {times[d] / torch['MOE_BENCH']:.2f}x" for d in dispatchers)
            + f" | DENSE_EQUIV {times['dense_equiv'] / torch['DENSE_EQUIV']:.2f}x   (goal <= 1.00)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", default="4,8,16,32")
    parser.add_argument("--group_size", type=int, default=256)
    parser.add_argument("--train_step_dispatchers", default="einsum,alltoall,dropless")
    parser.add_argument("--skip_train_step", action="store_true")
    parser.add_argument("--no_peers", action="store_true", help="skip the HF Mixtral / torch side")
    args = parser.parse_args()
    print(host_memory_line())
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with sharding.use_mesh(mesh):
        bench_layers([int(e) for e in args.experts.split(",")], args.repeats, args.group_size)
    if not args.skip_train_step:
        bench_train_step(args.repeats, args.group_size, args.train_step_dispatchers.split(","), not args.no_peers)


if __name__ == "__main__":
    main()

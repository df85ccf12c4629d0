"""DENSE_BENCH train step FLOP/s as a fraction of the f32 matmul peak measured in the same process.

  .venv/bin/python bench/train_step.py [--repeats 10] [--mlp_dim 1536]

Model FLOPs/step = 6 N T + 6 L d seq T (BENCH.md): 231.9 GFLOP for DENSE_BENCH.
Goal: >= 0.75 of PEAK (Hugging Face transformers + torch on the same machine: 0.69, 0.74 compiled).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import best_time, dense_bench_config, train_step_runner  # noqa: E402
from btx_jax.flops import measure_matmul_flops, train_flops_per_token  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mlp_dim", type=int, default=1536)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan_unroll", type=int, default=1)
    args = parser.parse_args()
    config = dense_bench_config(args.mlp_dim)
    config.model.update(remat=args.remat, scan_unroll=args.scan_unroll)
    tokens = config.data.batch_size * config.data.seq_len
    flops = train_flops_per_token(config.model, config.data.seq_len) * tokens
    run = train_step_runner(config)
    peak = measure_matmul_flops()
    step_s = best_time(run, args.repeats)
    peak_after = measure_matmul_flops()
    peak = max(peak, peak_after)
    print(f"PEAK (f32 2048^3 matmul, best of 10): {peak / 1e9:.1f} GFLOP/s")
    print(f"DENSE step: {flops / 1e9:.1f} GFLOP in {step_s * 1e3:.1f} ms (median of {args.repeats}) = "
          f"{flops / step_s / 1e9:.1f} GFLOP/s, {tokens / step_s:,.0f} tokens/s")
    print(f"ratio model FLOP/s / PEAK = {flops / step_s / peak:.3f}   (goal >= 0.75; HF torch 0.69, compiled 0.74)")


if __name__ == "__main__":
    main()

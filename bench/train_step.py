"""DENSE_BENCH and DENSE_EQUIV train steps, next to Hugging Face transformers + torch on the same CPU.

  .venv/bin/python bench/train_step.py [--repeats 5] [--no_peers]

Model FLOPs/step = 6 N T + 6 L d seq T (BENCH.md): 231.9 GFLOP for DENSE_BENCH (FFN 1536), and
DENSE_EQUIV is the same model with FFN 3072. PEAK is each framework's best f32 2048^3 matmul in its
own process. The torch side (bench/peers.py: LlamaForCausalLM of the same sizes, forward with
labels, backward, AdamW, torch 2.13 eager, 2 threads) runs in the Python 3.11 torch venv, which
this script builds on first use; without it (--no_peers, or no Python 3.11) our figures print alone.
Goals: model FLOP/s >= 0.75 of PEAK, tokens/s >= torch's.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before jax is imported: both sides run with the CLI's host memory setting
    from btx_jax import host_memory

    host_memory.reexec_with_huge_pages(keep_freed=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import dense_bench_config, train_step_runner  # noqa: E402
from timing import best_time, host_memory_line, minor_faults  # noqa: E402
from btx_jax.flops import measure_matmul_flops, train_flops_per_token  # noqa: E402

FFN = {"DENSE_BENCH": 1536, "DENSE_EQUIV": 3072}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="DENSE_BENCH,DENSE_EQUIV")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan_unroll", type=int, default=0, help="0: auto (unrolled on CPU)")
    parser.add_argument("--no_peers", action="store_true", help="skip the torch side")
    args = parser.parse_args()
    models = args.models.split(",")
    peak = measure_matmul_flops()
    ours = {}
    for name in models:
        config = dense_bench_config(FFN[name])
        config.model.update(remat=args.remat, scan_unroll=args.scan_unroll)
        tokens = config.data.batch_size * config.data.seq_len
        flops = train_flops_per_token(config.model, config.data.seq_len) * tokens
        run = train_step_runner(config)
        ours[name] = (best_time(run, args.repeats), flops, tokens, minor_faults(run))
    peak = max(peak, measure_matmul_flops())
    torch = None
    if not args.no_peers:
        from peers import torch_figures
        torch = torch_figures(tuple(models), args.repeats)
    print(host_memory_line())
    print(f"PEAK (f32 2048^3 matmul): btx_jax {peak / 1e9:.1f} GFLOP/s"
          + (f", torch {torch['PEAK'] / 1e9:.1f} GFLOP/s ({torch['torch']}, transformers {torch['transformers']})"
             if torch else "  (no torch venv: our figures alone)"))
    print(f"{'model':<12} {'GFLOP':>7} | {'btx_jax s':>9} {'tok/s':>7} {'/PEAK':>6} {'faults':>7} |"
          + (f" {'torch s':>8} {'tok/s':>7} {'/PEAK':>6} | {'ours/torch time':>15}" if torch else ""))
    for name, (seconds, flops, tokens, faults) in ours.items():
        line = (f"{name:<12} {flops / 1e9:7.1f} | {seconds:9.3f} {tokens / seconds:7.0f} "
                f"{flops / seconds / peak:6.3f} {faults:7d} |")
        if torch:
            t = torch[name]
            line += f" {t:8.3f} {tokens / t:7.0f} {flops / t / torch['PEAK']:6.3f} | {seconds / t:15.2f}"
        print(line)
    print("goals: /PEAK >= 0.75 and btx_jax tokens/s >= torch's (ours/torch time <= 1.00)")


if __name__ == "__main__":
    main()

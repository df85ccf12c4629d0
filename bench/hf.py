"""HF_BENCH: Hugging Face import and export of a Llama-shaped checkpoint: speed as a ratio of `cp` of
the same bytes, and peak RSS as a multiple of the largest tensor and of the largest stacked leaf.

  .venv/bin/python bench/hf.py [--workdir /tmp/btx_hf_bench] [--keep]

A random LlamaForCausalLM directory (written with numpy + safetensors, no torch): d_model 2048,
8 layers, 16 heads (4 kv heads), FFN 5504, vocab 32000, bf16, in 2 shards (~0.9 GB). In one run:
`cp -r` of it, `python -m btx_jax.hf import` (bf16 params), `python -m btx_jax.hf export` of the
result, then `cp -r` again. Peak RSS is each command's own (VmHWM) above a bare interpreter that
imports the same modules. Import streams one stacked leaf (L layers of one tensor) at a time,
export one leaf plus at most one shard: neither grows with the number of leaves.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4)
PEAK = ("import resource, sys, runpy; sys.argv = sys.argv[1:]; "
        "exit_code = 0\ntry:\n    runpy.run_module(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
        "    exit_code = e.code or 0\n"
        "print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "sys.exit(exit_code)")


def write_llama(path: str) -> tuple[int, int]:
    """A random bf16 Llama directory in two shards; returns (total bytes, largest tensor bytes)."""
    os.makedirs(path)
    s, rng = SHAPE, np.random.default_rng(0)
    d, f, v, heads, kv = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_attention_heads"], \
        s["num_key_value_heads"]
    dh = d // heads
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (heads * dh, d), p + "self_attn.k_proj.weight": (kv * dh, d),
                   p + "self_attn.v_proj.weight": (kv * dh, d), p + "self_attn.o_proj.weight": (d, heads * dh),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
    names = sorted(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, half in enumerate(halves):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(ml_dtypes.bfloat16) for n in half},
                  os.path.join(path, file), metadata={"format": "pt"})
        weight_map |= {n: file for n in half}
    total = sum(int(np.prod(x)) * 2 for x in shapes.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPE, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                   "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096}, fh)
    return total, max(int(np.prod(x)) * 2 for x in shapes.values())


def timed(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a command run under the VmHWM wrapper."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK, *cmd], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{cmd} failed:\n{result.stderr[-3000:]}")
    peak = int(result.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return seconds, peak


def cp(src: str, dst: str) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/btx_hf_bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir = os.path.join(args.workdir, "hf")
    total, largest = write_llama(hf_dir)
    ffn_leaf = SHAPE["num_hidden_layers"] * SHAPE["intermediate_size"] * SHAPE["hidden_size"] * 2  # [L, D, F] bf16
    stacked = max(largest, ffn_leaf)
    baseline = timed(["btx_jax.hf.convert"])[1]  # the same imports (jax, orbax, safetensors), no work
    cp_before = cp(hf_dir, os.path.join(args.workdir, "copy"))
    imp_s, imp_peak = timed(["btx_jax.hf", "import", "--hf_dir", hf_dir, "--output",
                             os.path.join(args.workdir, "ours"), "--param_dtype", "bfloat16"])
    exp_s, exp_peak = timed(["btx_jax.hf", "export", "--checkpoint", os.path.join(args.workdir, "ours"),
                             "--output", os.path.join(args.workdir, "back"), "--max_shard_size", "500MB"])
    cp_after = cp(hf_dir, os.path.join(args.workdir, "copy"))
    cp_s = (cp_before + cp_after) / 2
    rows = {"model GB": total / 1e9, "largest tensor GB": largest / 1e9, "largest stacked leaf GB": stacked / 1e9,
            "cp s (mean of 2)": cp_s,
            "import s": imp_s, "import speed / cp": cp_s / imp_s,
            "import peak RSS above baseline / largest stacked leaf": (imp_peak - baseline) / stacked,
            "import peak RSS above baseline / model": (imp_peak - baseline) / total,
            "export s": exp_s, "export speed / cp": cp_s / exp_s,
            "export peak RSS above baseline / largest stacked leaf": (exp_peak - baseline) / stacked,
            "export peak RSS above baseline / model": (exp_peak - baseline) / total,
            "baseline RSS GB (the modules imported, no work)": baseline / 1e9}
    print("HF_BENCH (Llama d2048 L8 bf16, 2 shards)")
    for key, value in rows.items():
        print(f"  {key:<58} {value:8.3f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""SURGEON_BENCH: the checkpoint surgeon's speed as a ratio of `cp` of the same bytes, and its peak RSS.

  .venv/bin/python bench/mix.py [--workdir /tmp/btx_surgeon_bench] [--keep]

Three dense experts branched from one seed (seed + small noise): d_model 2048, 8 layers,
16 heads, FFN 5504, vocab 32000, bf16 (~1.07 GB each), merged into a 4-expert MoE (3 experts
+ the seed's FFN), attention / embeddings / norms averaged. In one run: `cp -r` of the four
source checkpoints, the surgeon (`python -m btx_jax.mix`, imports included) reading the same
four checkpoints, then `cp -r` again. Prints surgeon throughput / cp throughput (time of cp /
time of the surgeon, both over the same input bytes) and peak RSS above the interpreter's
baseline as a multiple of the largest merged leaf. Goals: >= 0.8x cp, <= 3x the leaf
(mergekit-moe on this machine: 0.30-0.44x cp, 5.3 GB peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=32000, d_model=2048, num_layers=8, num_heads=16, num_kv_heads=16, head_dim=128,
             mlp_dim=5504, dtype="bfloat16", param_dtype="bfloat16")

CONFIG = """
from btx_jax.config import base_config
def get_config(variant=None):
    c = base_config()
    c.model.update(**{model})
    c.data.update(seq_len=256, batch_size=8)
    c.moe.update(num_experts=4)
    c.mix.update(experts="{root}/expert0,{root}/expert1,{root}/expert2", seed="{root}/seed", seed_expert=True,
                 output="{root}/mixed")
    c.mesh.update(data=1)
    return c
"""


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def make_sources(root: str) -> None:
    """Seed (random, bf16) and three experts (seed + 1% noise), written as btx_jax.train writes them."""
    import jax
    import ml_dtypes
    import orbax.checkpoint as ocp

    sys.path.insert(0, REPO)
    from btx_jax.config import base_config
    from btx_jax.sharding import make_mesh
    from btx_jax.state import make_setup

    config = base_config()
    config.model.update(**MODEL)
    shapes = make_setup(config, make_mesh(config.mesh, jax.devices()[:1])).abstract_params
    rng = np.random.default_rng(0)
    seed = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16), shapes)
    for name in ("seed", "expert0", "expert1", "expert2"):
        params = seed if name == "seed" else jax.tree.map(
            lambda a: (a.astype(np.float32) + rng.standard_normal(a.shape, np.float32) * 2e-4).astype(a.dtype), seed)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(root, name, "checkpoints", "100", "state"), {"params": params, "step": np.int32(100)})
        ckpt.wait_until_finished()
        print(f"wrote {name}: {du(os.path.join(root, name)) / 1e9:.2f} GB", flush=True)


def timed_cp(sources: list[str], dest: str) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *sources, dest], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/btx_surgeon_bench")
    parser.add_argument("--keep", action="store_true", help="keep the sources for another run")
    args = parser.parse_args()
    root = os.path.abspath(args.workdir)
    sources = [os.path.join(root, n) for n in ("seed", "expert0", "expert1", "expert2")]
    if not all(os.path.isdir(s) for s in sources):
        make_sources(root)
    in_bytes = sum(du(s) for s in sources)
    config_path = os.path.join(root, "mix_config.py")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(model=MODEL, root=root))
    shutil.rmtree(os.path.join(root, "mixed"), ignore_errors=True)

    cp_before = timed_cp(sources, os.path.join(root, "copy"))
    start = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "btx_jax.mix", f"--config={config_path}"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    mix_s = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"surgeon failed:\n{result.stderr[-3000:]}")
    cp_after = timed_cp(sources, os.path.join(root, "copy"))
    cp_s = (cp_before + cp_after) / 2
    manifest = json.load(open(os.path.join(root, "mixed", "manifest.json")))
    leaf, extra = manifest["largest_leaf_bytes"], manifest["peak_rss_bytes"] - manifest["rss_before_merge_bytes"]
    print(f"sources: 4 x ~{in_bytes / 4e9:.2f} GB = {in_bytes / 1e9:.2f} GB; output {du(os.path.join(root, 'mixed')) / 1e9:.2f} GB")
    print(f"cp -r of the sources: {cp_before:.1f} s / {cp_after:.1f} s (mean {in_bytes / cp_s / 1e6:.0f} MB/s)")
    print(f"surgeon: {mix_s:.1f} s wall incl. imports ({manifest['seconds']:.1f} s merging) = "
          f"{in_bytes / mix_s / 1e6:.0f} MB/s of input")
    print(f"throughput ratio surgeon / cp = {cp_s / mix_s:.2f}x (merging alone {cp_s / manifest['seconds']:.2f}x)"
          "   (goal >= 0.8x; mergekit-moe 0.30-0.44x)")
    print(f"peak RSS {manifest['peak_rss_bytes'] / 1e9:.2f} GB, {extra / 1e9:.2f} GB above the "
          f"{manifest['rss_before_merge_bytes'] / 1e9:.2f} GB baseline = {extra / leaf:.2f}x the largest merged leaf "
          f"({leaf / 1e9:.3f} GB)   (goal <= 3x; mergekit-moe 5.3 GB)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

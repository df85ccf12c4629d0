"""SURGEON_BENCH: the checkpoint surgeon's peak memory at 4 and 8 experts, and its speed as a ratio of `cp`.

  .venv/bin/python bench/mix.py [--workdir /tmp/btx_surgeon_bench] [--keep] [--memory_budget GB]

Three dense experts branched from one seed (seed + small noise): d_model 2048, 8 layers, 16 heads,
FFN 5504, vocab 32000, bf16 (~1.07 GB each), merged into a 4-expert MoE (3 experts + the seed's
FFN) and into an 8-expert MoE from the same four sources (each FFN twice, ``mix.copies``);
attention / embeddings / norms averaged. In one run: `cp -r` of the four source checkpoints, the
surgeon (`python -m btx_jax.mix`, imports included) at E=4, `cp -r`, the surgeon at E=8, `cp -r`.

Prints, side by side: peak RSS above the interpreter's baseline at E=4 and E=8 (goal: equal within
10%, while the largest merged leaf doubles) and against the memory budget; surgeon throughput / cp
throughput, both over the same input bytes, against the median of the three cp runs (goal >= 0.8x;
mergekit-moe on this machine 0.30-0.44x, 5.3 GB peak RSS).
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


def timed_surgeon(root: str, config_path: str, num_experts: int, memory_budget: float) -> tuple[float, dict]:
    """Wall seconds of `python -m btx_jax.mix` (imports and the final sync included) and its manifest."""
    output = os.path.join(root, "mixed")
    shutil.rmtree(output, ignore_errors=True)
    args = [f"--config={config_path}", f"--config.moe.num_experts={num_experts}",
            f"--config.mix.copies={num_experts > 4}", f"--config.mix.memory_budget={memory_budget}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "btx_jax.mix", *args], cwd=REPO, env=env, capture_output=True,
                            text=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"surgeon (E={num_experts}) failed:\n{result.stderr[-3000:]}")
    manifest = json.load(open(os.path.join(output, "manifest.json")))
    manifest["output_bytes_on_disk"] = du(output)
    shutil.rmtree(output)
    return seconds, manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/btx_surgeon_bench")
    parser.add_argument("--keep", action="store_true", help="keep the sources for another run")
    parser.add_argument("--memory_budget", type=float, default=0.0,
                        help="config.mix.memory_budget in GB (0: the surgeon's default)")
    args = parser.parse_args()
    root = os.path.abspath(args.workdir)
    sources = [os.path.join(root, n) for n in ("seed", "expert0", "expert1", "expert2")]
    if not all(os.path.isdir(s) for s in sources):
        make_sources(root)
    in_bytes = sum(du(s) for s in sources)
    config_path = os.path.join(root, "mix_config.py")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(model=MODEL, root=root))

    # cp before, between and after the two surgeon runs; the ratio is against the median of the three
    # (the disk's write-back makes single cp times swing 2-4x here)
    cps, runs = [timed_cp(sources, os.path.join(root, "copy"))], {}
    for e in (4, 8):
        runs[e] = timed_surgeon(root, config_path, e, args.memory_budget)
        cps.append(timed_cp(sources, os.path.join(root, "copy")))
    cp_s = float(np.median(cps))

    print(f"sources: 4 x ~{in_bytes / 4e9:.2f} GB = {in_bytes / 1e9:.2f} GB on disk (zstd, as btx_jax.train "
          "writes them)")
    print(f"cp -r of the sources (+ sync): {' / '.join(f'{t:.1f}' for t in cps)} s, median {cp_s:.1f} s "
          f"({in_bytes / cp_s / 1e6:.0f} MB/s)")
    print(f"{'':>4} {'output GB':>9} {'largest leaf GB':>15} {'tiles':>5} {'budget GB':>9} "
          f"{'peak RSS above baseline GB':>26} {'wall s':>7} {'merging s':>9} {'vs cp':>6} {'merging vs cp':>13}")
    for e, (wall, m) in runs.items():
        extra = m["peak_rss_bytes"] - m["rss_before_merge_bytes"]
        budget = m["memory_budget_bytes"]
        print(f"E={e:<2} {m['output_bytes_on_disk'] / 1e9:>9.2f} {m['largest_leaf_bytes'] / 1e9:>15.3f} "
              f"{m['tiles']:>5} {budget / 1e9:>9.3f} {extra / 1e9:>12.3f} ({extra / budget:.2f}x budget) "
              f"{wall:>7.1f} {m['seconds']:>9.1f} {cp_s / wall:>5.2f}x {cp_s / m['seconds']:>12.2f}x")
    extra = {e: m["peak_rss_bytes"] - m["rss_before_merge_bytes"] for e, (_, m) in runs.items()}
    print(f"peak RSS above baseline, E=8 / E=4 = {extra[8] / extra[4]:.2f}   (goal: within 10%; the largest merged "
          f"leaf doubles; mergekit-moe 5.3 GB)")
    print(f"throughput surgeon / cp (same input bytes, wall incl. ~{runs[4][0] - runs[4][1]['seconds']:.0f} s of "
          f"imports and setup): E=4 {cp_s / runs[4][0]:.2f}x, E=8 {cp_s / runs[8][0]:.2f}x   (goal >= 0.8x; "
          "mergekit-moe 0.30-0.44x)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

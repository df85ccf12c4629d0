"""``python -m btx_jax.data.build --config configs/demo_dense.py``: builds every domain's dataset.

Training builds missing demo/files datasets by itself (``data.build_if_missing``); this
command does it ahead of time (e.g. once, before launching many jobs) and prints what it found.
"""
from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

from btx_jax import config as config_lib
from btx_jax.data import datasets, pipeline



def build_all(data_config) -> dict[str, dict[str, int]]:
    """{domain: {split: number of documents}} after building whatever was missing."""
    data_config = data_config.copy_and_resolve_references()
    data_config.build_if_missing = True
    names = pipeline.domain_names(data_config) + sorted(data_config.eval_domains.keys())
    counts = {}
    for split in ("train", "eval"):
        for name, source in pipeline.open_sources(data_config, split, names).items():
            counts.setdefault(name, {})[split] = len(source)
    return counts


def _define_flags():
    """Command-line flags, defined only when run as a program (so the module stays importable)."""
    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file whose data.domains to build.", lock_config=True)


def main(argv):
    del argv
    config = config_lib.validate(_CONFIG.value)
    try:
        counts = build_all(config.data)
    except datasets.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, c in counts.items():
        print(f"[data] {name:>12}: {c['train']:>8} train / {c['eval']:>6} eval documents")


if __name__ == "__main__":
    _define_flags()
    app.run(main)

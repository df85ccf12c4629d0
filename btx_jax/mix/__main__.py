"""The surgeon's command line: ``python -m btx_jax.mix --config configs/mix_demo.py [--dry-run]``; and
``python -m btx_jax.mix add|remove ...``: adding or removing an expert of an MoE (btx_jax/mix/lifecycle.py).

Multi-process (one output, each process writing its share):
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process (see btx_jax.distributed).
"""
import sys

if __name__ == "__main__":  # before jax is imported: see btx_jax/host_memory.py
    from btx_jax import host_memory

    host_memory.reexec_with_huge_pages()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from btx_jax import compilation_cache, config as config_lib, distributed  # noqa: E402
from btx_jax.mix.plan import MixError  # noqa: E402
from btx_jax.mix.surgeon import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Mix config, e.g. configs/mix_demo.py.", lock_config=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (each target leaf, its sources, rule, shape, bytes, "
                             "tiles) and exit without writing.")
distributed.define_flags()


def main(argv):
    del argv
    compilation_cache.enable()
    logging.set_verbosity(logging.WARNING)
    distributed.initialize("[mix]")
    try:
        run(_CONFIG.value, dry_run=_DRY_RUN.value)
    except (MixError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: writing the merged checkpoint failed: {e}\n  nothing was written at config.mix.output; "
              "fix the cause (e.g. free disk space) and rerun", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("add", "remove"):  # the expert lifecycle (btx_jax/mix/lifecycle.py)
        from btx_jax.mix import lifecycle

        sys.exit(lifecycle.main(sys.argv[1:]))
    sys.argv = ["--dry_run" if a == "--dry-run" else a for a in sys.argv]
    flags.mark_flags_as_required(["config"])
    app.run(main)

"""``python -m btx_jax.hf import|export``: Hugging Face checkpoints in and out.

  python -m btx_jax.hf import --hf_dir ~/models/SmolLM-135M --output runs/smol/checkpoint
  python -m btx_jax.hf export --checkpoint runs/btx/finetune --output runs/btx/hf --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-2]) * factor)
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m btx_jax.hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Llama/Mistral/Mixtral directory -> a btx_jax params checkpoint")
    imp.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    imp.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"),
                     help="dtype of the imported params (float32 for training; bfloat16 halves the size)")
    imp.add_argument("--ignore_fields", default="",
                     help="comma-separated config.json fields you accept to lose (e.g. sliding_window)")
    exp = sub.add_parser("export", help="a btx_jax checkpoint -> a LlamaForCausalLM / MixtralForCausalLM directory")
    exp.add_argument("--checkpoint", required=True, help="a training workdir, its checkpoints/ or step dir, "
                     "a surgeon output or an imported checkpoint")
    exp.add_argument("--output", required=True, help="new Hugging Face directory (must not exist)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="tensor dtype (default: the checkpoint's)")
    exp.add_argument("--max_shard_size", default="2GB", help="largest shard, e.g. 5GB, 500MB")
    exp.add_argument("--tokenizer_dir", default=None, help="copy tokenizer files (and BOS/EOS ids) from here "
                     "(default: the directory an imported checkpoint came from)")
    exp.add_argument("--max_position_embeddings", type=int, default=None,
                     help="written to config.json (RoPE has no limit here; default: the source's, else 4096)")
    exp.add_argument("--save_logits", action="store_true",
                     help="also save our logits on fixed token ids (btx_jax_logits.npz) for "
                          "scripts/make_hf_fixtures.py --check")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from btx_jax import checkpoint
    from btx_jax.hf import HFError, export_checkpoint, import_checkpoint

    try:
        if args.command == "import":
            import_checkpoint(args.hf_dir, args.output, param_dtype=args.param_dtype,
                              ignore_fields=tuple(f for f in args.ignore_fields.split(",") if f))
        else:
            export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, max_shard_bytes=_size(args.max_shard_size),
                              tokenizer_dir=args.tokenizer_dir, max_position_embeddings=args.max_position_embeddings,
                              save_logits=args.save_logits)
    except (HFError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}\n  nothing was left at --output; fix the cause (e.g. free disk space) and rerun",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Llama-2-7B shapes, for TPU pods: a dense seed (or domain expert) at the BTX paper's scale.

  python -m btx_jax.train --config configs/llama2_7b.py --workdir gs://BUCKET/runs/seed \
      --config.data.spm_model=/path/to/tokenizer.model --config.data.domains.web=tfds:...

Launched on every host of a pod slice by launch/tpu_pod.sh. Parameters and optimizer state
are fully sharded over the `fsdp` axis (all devices by default): on a v5p-256 (128 chips),
params + Adam state take about 0.63 GB per chip (see tests/test_llama2_7b.py).
"""
from btx_jax.config import base_config


def get_config(variant: str | None = None):
    c = base_config()
    c.model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                   head_dim=128, mlp_dim=11008, rope_theta=10_000.0, norm_eps=1e-5,
                   tie_embeddings=False, dtype="bfloat16", param_dtype="float32", remat="dots")
    c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    c.data.update(tokenizer="sentencepiece", spm_model="tokenizer.model", seq_len=4096, batch_size=256,
                  data_dir="gs://BUCKET/tfds", build_if_missing=False)
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, z_loss=1e-4)
    c.train.update(steps=100_000, log_every=10, eval_every=1000, eval_batches=16,
                   checkpoint_every=1000, keep_checkpoints=3)
    if variant is not None:
        raise ValueError(f"llama2_7b.py has no variant {variant!r}")
    return c

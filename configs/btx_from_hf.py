"""BTX from a pretrained seed in Hugging Face format (Llama 2/3, Mistral, TinyLlama, SmolLM, ...).

  python -m btx_jax.recipe --config configs/btx_from_hf.py:/path/to/SmolLM-135M --workdir runs/btx_smol

The variant is the checkpoint directory. Its ``config.json`` gives the model fields, its tokenizer
drives the data pipeline (``hf:DIR``, with its BOS/EOS), and the seed stage imports its weights
(``recipe.seed_from``) instead of training: the recipe starts at the branches. Everything else is
the demo's recipe (``configs/btx_demo.py``: code / math / prose experts plus the seed's FFN, top-2,
centroid router, every baseline), with learning rates for a pretrained model. The demo's steps
are sized for its tiny model; raise ``recipe.branch_steps`` / ``finetune_steps`` and
``data.seq_len`` for a real run.
"""
import os

from btx_jax.config import load_config
from btx_jax.hf.hf_config import from_hf, read_config


def get_config(variant: str | None = None):
    if not variant:
        raise ValueError("configs/btx_from_hf.py needs the checkpoint directory: --config configs/btx_from_hf.py:DIR")
    hf_dir = os.path.abspath(os.path.expanduser(variant))
    here = os.path.dirname(os.path.abspath(__file__))
    c = load_config(os.path.join(here, "btx_demo.py"))
    model, _, _ = from_hf(read_config(hf_dir))
    c.model.update(**model)
    c.data.update(tokenizer=f"hf:{hf_dir}")
    c.recipe.update(seed_from=hf_dir, seed_share=0.0, branch_lr=1e-4, finetune_lr=1e-4)
    c.optim.update(lr=1e-4)
    return c

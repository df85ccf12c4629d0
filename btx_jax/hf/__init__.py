"""Hugging Face interop: Llama-family and Mixtral checkpoints in and out.

- :mod:`btx_jax.hf.hf_config`: ``config.json`` <-> our ``model`` / ``moe`` config sections.
- :mod:`btx_jax.hf.names`: which Hugging Face tensor each of our parameters is, and the layout change.
- :mod:`btx_jax.hf.files`: safetensors directories (sharded or not), read one tensor at a time.
- :mod:`btx_jax.hf.convert`: import to an Orbax checkpoint, export to a Hugging Face directory.

``python -m btx_jax.hf import|export --help`` is the command line.
"""
from btx_jax.hf.convert import DenseReader, export_checkpoint, import_checkpoint
from btx_jax.hf.files import is_hf_dir
from btx_jax.hf.hf_config import HFError

__all__ = ["DenseReader", "HFError", "export_checkpoint", "import_checkpoint", "is_hf_dir"]

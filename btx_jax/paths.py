"""Run paths that may be local or URLs (``gs://...``): one way to resolve them, with etils.epath.

Every path a run reads or writes (workdir, checkpoints, ``train.init_from``, data and report
directories, Hugging Face directories) goes through :func:`resolve`, so a URL reaches Orbax,
tensorstore and TFDS unchanged while a local path behaves as ``os.path.abspath`` made it.
``gs://`` needs ``gcsfs`` (epath's backend when TensorFlow is absent), a dependency.
"""
from __future__ import annotations

import re

from etils import epath

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes etils.epath reads and writes


def is_url(path) -> bool:
    return bool(_URL.match(str(path)))


def resolve(path) -> epath.Path:
    """A URL unchanged; a local path with ``~`` expanded and made absolute."""
    match = _URL.match(str(path))
    if match:
        if match.group(1) not in SCHEMES:
            raise ValueError(f"{path}: {match.group(1)}:// is not a storage btx_jax can use; "
                             f"use a local path or one of {', '.join(s + '://' for s in SCHEMES)}")
        return epath.Path(str(path))
    return epath.Path(path).expanduser().resolve()

"""Tokenizers with one shared id layout: 0 = pad, 1 = begin of document, 2 = end of document.

The byte tokenizer needs nothing downloaded (ids 3..258 are the UTF-8 bytes); the
SentencePiece tokenizer loads a ``.model`` file, e.g. one trained on the corpus with
``python -m btx_jax.data.train_tokenizer``.
"""
from __future__ import annotations

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted past the three special ids: any text, no vocabulary file."""

    vocab_size = 256 + 3

    def encode(self, text: bytes | str) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + 3

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes((ids[ids >= 3] - 3).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model trained with pad=0, bos=1, eos=2 (see train_tokenizer)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{model_path}: special ids (pad, bos, eos) are {ids}, expected (0, 1, 2); "
                             "retrain it with `python -m btx_jax.data.train_tokenizer`")
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: bytes | str) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])


def make_tokenizer(data_config):
    if data_config.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(data_config.spm_model)
    return ByteTokenizer()


def encode_document(tokenizer, text: bytes | str) -> np.ndarray:
    """[BOS] text [EOS]: the loss learns where documents start and end."""
    return np.concatenate([[BOS_ID], tokenizer.encode(text), [EOS_ID]]).astype(np.int32)

"""Tokenizers: ``encode`` gives a document's ids, ``bos_id`` / ``eos_id`` frame it (None: not added).

The byte tokenizer needs nothing downloaded (ids 3..258 are the UTF-8 bytes; 0 pad, 1 BOS, 2
EOS); the SentencePiece tokenizer loads a ``.model`` file trained with those special ids, e.g. by
``python -m btx_jax.data.train_tokenizer``; ``hf:DIR`` uses the tokenizer shipped with a Hugging
Face checkpoint, with its own BOS/EOS. Padding is marked by segment id 0, never by a token id.
"""
from __future__ import annotations

import json

import numpy as np

from btx_jax import paths

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted past the three special ids: any text, no vocabulary file."""

    vocab_size = 256 + 3
    bos_id, eos_id = BOS_ID, EOS_ID

    def encode(self, text: bytes | str) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + 3

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes((ids[ids >= 3] - 3).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model trained with pad=0, bos=1, eos=2 (see train_tokenizer)."""

    bos_id, eos_id = BOS_ID, EOS_ID

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=paths.resolve(model_path).read_bytes())
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


def _json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory: ``tokenizer.json`` (the ``tokenizers``
    package) or else ``tokenizer.model`` (SentencePiece). BOS and EOS come from the checkpoint's
    ``config.json`` (else ``generation_config.json``, else ``tokenizer_config.json``'s tokens); the text
    itself is encoded without special tokens, as ``AutoTokenizer(..., add_special_tokens=False)`` does."""

    def __init__(self, directory: str):
        directory = paths.resolve(directory)
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str((directory / "tokenizer.json").read_text())
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        elif (directory / "tokenizer.model").is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=(directory / "tokenizer.model").read_bytes())
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise FileNotFoundError(f"{directory} has no tokenizer.json or tokenizer.model")
        config = _json(directory / "config.json")
        generation = _json(directory / "generation_config.json")
        tokens = _json(directory / "tokenizer_config.json")
        self.bos_id, self.eos_id = (self._special(name, config, generation, tokens) for name in ("bos", "eos"))

    def _special(self, name: str, *sources: dict) -> int | None:
        for source in sources[:2]:
            value = source.get(f"{name}_token_id")
            if value is not None:
                return int(value[0] if isinstance(value, list) else value)
        token = sources[2].get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        return self.token_id(token) if token else None

    def token_id(self, token: str) -> int | None:
        if hasattr(self, "_tok"):
            return self._tok.token_to_id(token)
        piece = self._sp.piece_to_id(token)
        return None if piece == self._sp.unk_id() and token != self._sp.id_to_piece(piece) else piece

    def encode(self, text: bytes | str) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids = self._tok.encode(text, add_special_tokens=False).ids if hasattr(self, "_tok") else self._sp.encode(text)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode(ids) if hasattr(self, "_tok") else self._sp.decode(ids)


def make_tokenizer(data_config):
    if data_config.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(data_config.spm_model)
    if data_config.tokenizer.startswith("hf:"):
        return HFTokenizer(data_config.tokenizer[3:])
    return ByteTokenizer()


def encode_document(tokenizer, text: bytes | str) -> np.ndarray:
    """[BOS] text [EOS]: the loss learns where documents start and end (each only if the tokenizer has it)."""
    parts = [[tokenizer.bos_id]] if tokenizer.bos_id is not None else []
    parts += [tokenizer.encode(text)] + ([[tokenizer.eos_id]] if tokenizer.eos_id is not None else [])
    return np.concatenate(parts).astype(np.int32)

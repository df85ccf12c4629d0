"""Our byte tokenizer as a Hugging Face ``tokenizer.json``, so exported demo models load with
``AutoTokenizer`` (lm-evaluation-harness, vLLM) and tokenize exactly as btx_jax does.

Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, and byte b -> b + 3. Byte-level pre-tokenization (GPT-2's
byte-to-character table, no regex split) turns every byte into one character, and a BPE model
with no merges maps each character to its id; ``<s>`` is prepended as Llama's tokenizer does.
"""
from __future__ import annotations

import json

from btx_jax import paths
from btx_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

SPECIALS = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenization uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {b: chr(c) for b, c in chars.items()}


def write(directory: str) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = dict(SPECIALS) | {char: b + 3 for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    directory = paths.resolve(directory)
    (directory / "tokenizer.json").write_text(tok.to_str(pretty=True))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **specials}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

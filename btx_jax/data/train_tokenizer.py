"""``python -m btx_jax.data.train_tokenizer --config C --output runs/spm/demo --vocab_size 4096``

Trains a SentencePiece (BPE, byte fallback) model on an equal share of each training
domain, with the id layout the project expects (pad 0, bos 1, eos 2, unk 3). Use it with
``--config.data.tokenizer=sentencepiece --config.data.spm_model=<output>.model``.
"""
from __future__ import annotations

import os
import tempfile

from absl import app, flags
from ml_collections import config_flags

from btx_jax import config as config_lib, paths
from btx_jax.data import pipeline



def sample_text(data_config, path: str, max_bytes: int) -> None:
    """Writes about max_bytes of training text, an equal share per domain, one document per line."""
    sources = pipeline.open_sources(data_config, "train")
    share = max_bytes // len(sources)
    with open(path, "w", encoding="utf-8") as out:  # local: a temporary file
        for source in sources.values():
            written = 0
            for i in range(len(source)):
                text = source[i]["text"]
                text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                out.write(text.replace("\n", " ").strip() + "\n")
                written += len(text)
                if written >= share:
                    break


def train(data_config, output: str, vocab_size: int, max_mb: float) -> str:
    import sentencepiece as spm

    prefix = paths.resolve(output)  # local or a URL: trained in a temporary directory, then copied
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        sample_text(data_config, corpus, int(max_mb * 1e6))
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=1 << 16, minloglevel=2)
        for suffix in (".model", ".vocab"):
            (prefix.parent / (prefix.name + suffix)).write_bytes(paths.resolve(os.path.join(tmp, "spm" + suffix)).read_bytes())
    return output + ".model"


def _define_flags():
    """Command-line flags, defined only when run as a program (so the module stays importable)."""
    global _CONFIG, _OUTPUT, _VOCAB, _MAX_MB
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data.domains provide the text.",
                                              lock_config=True)
    _OUTPUT = flags.DEFINE_string("output", None, "Model prefix; writes <output>.model and <output>.vocab.")
    _VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Number of pieces.")
    _MAX_MB = flags.DEFINE_float("max_mb", 20.0, "Text to sample in total, split equally across domains.")


def main(argv):
    del argv
    if not _OUTPUT.value:
        raise app.UsageError("--output is required (a path prefix for the .model file)")
    config = config_lib.validate(_CONFIG.value)
    model = train(config.data, _OUTPUT.value, _VOCAB.value, _MAX_MB.value)
    print(f"[tokenizer] wrote {model}; use --config.data.tokenizer=sentencepiece "
          f"--config.data.spm_model={model} --config.model.vocab_size={_VOCAB.value}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)

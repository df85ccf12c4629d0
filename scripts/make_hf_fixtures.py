"""Tiny random Hugging Face checkpoints and transformers' outputs on them, for btx_jax's tests.

Runs in the torch venv (``bash scripts/make_hf_venv.sh``), not the main one:

  .venv-hf/bin/python scripts/make_hf_fixtures.py                 # (re)writes tests/fixtures/hf/
  .venv-hf/bin/python scripts/make_hf_fixtures.py --check DIR     # a directory from `btx_jax.hf export
                                                                  #  --save_logits`: transformers vs ours

Fixtures (every weight random, norms included, so a swapped or transposed tensor shows):
  llama_gqa/      LlamaForCausalLM, GQA (4 query / 2 kv heads), untied, sharded with an index,
                  with a BPE tokenizer (tokenizer.json) and its encodings of a few texts
  llama_tied/     LlamaForCausalLM, tied embeddings, head_dim != hidden / heads, Llama 3.1 RoPE scaling
  mixtral/        MixtralForCausalLM, 4 experts, top-2, GQA
Each has expected.npz: input_ids [2, 16], float32 logits, and for Mixtral each layer's router
logits [L, B*T, E] and top-2 experts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf")
TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.", "x^2 + 2x + 1 = (x+1)^2"]
SMALL = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random: matrices N(0, 0.1), norm scales 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)


def tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [open(transformers.__file__, encoding="utf-8").read(), *TEXTS] * 2
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    encodings = {text: auto(text, add_special_tokens=False)["input_ids"] for text in TEXTS}
    with open(os.path.join(path, "expected_tokens.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": auto.bos_token_id, "eos_token_id": auto.eos_token_id, "encodings": encodings}, f,
                  indent=1)


def save(model, path: str, seed: int, shard: str | None = None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, model.config.vocab_size, (2, 16)))
    with torch.no_grad():
        kwargs = {"output_router_logits": True} if "mixtral" in model.config.model_type else {}
        result = model(input_ids=ids, **kwargs)
    arrays = {"input_ids": ids.numpy().astype(np.int32), "logits": result.logits.float().numpy()}
    if kwargs:
        router = torch.stack([r.float() for r in result.router_logits]).numpy()  # [L, B*T, E]
        arrays |= {"router_logits": router,
                   "experts": np.argsort(-router, axis=-1, kind="stable")[..., :model.config.num_experts_per_tok]}
    np.savez(os.path.join(path, "expected.npz"), **arrays)
    print(f"{path}: {sum(p.numel() for p in model.parameters())} params, "
          f"{sorted(os.listdir(path))}")


def make_all() -> None:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SMALL, rms_norm_eps=1e-5, tie_word_embeddings=False))
    save(llama, os.path.join(OUT, "llama_gqa"), seed=1, shard="60KB")
    tokenizer(os.path.join(OUT, "llama_gqa"))
    tied = LlamaForCausalLM(LlamaConfig(
        **SMALL, head_dim=12, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8, "rope_theta": 500000.0}, rope_theta=500000.0))
    save(tied, os.path.join(OUT, "llama_tied"), seed=2)
    mixtral = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                               tie_word_embeddings=False))
    save(mixtral, os.path.join(OUT, "mixtral"), seed=3)
    with open(os.path.join(OUT, "VERSIONS.json"), "w", encoding="utf-8") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)


def check(directory: str) -> None:
    """Loads an exported directory with transformers and compares its logits with ours (btx_jax_logits.npz)."""
    ours = np.load(os.path.join(directory, "btx_jax_logits.npz"))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ours["input_ids"]).long()).logits.float().numpy()
    diff = np.abs(theirs - ours["logits"])
    scale = np.abs(theirs).max()
    agree = (theirs.argmax(-1) == ours["logits"].argmax(-1)).mean()
    report = {"directory": directory, "architecture": model.config.architectures[0],
              "transformers": transformers.__version__, "torch": torch.__version__,
              "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "max_abs_logit": float(scale), "argmax_agreement": float(agree)}
    if "text" in ours:  # real text through the exported tokenizer: same ids, same NLL?
        text, ids = str(ours["text"]), ours["text_ids"][0]
        hf_ids = transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"][:len(ids)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids[None]).long()).logits.double()[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]).long()).item()
        report |= {"text_tokens": len(ids), "tokenizer_ids_equal": list(hf_ids) == ids.tolist(),
                   "text_nll_transformers": nll, "text_nll_btx_jax": float(ours["text_nll"])}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="DIR", help="compare an exported directory's logits with ours")
    args = parser.parse_args()
    check(args.check) if args.check else make_all()

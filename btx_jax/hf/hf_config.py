"""Hugging Face ``config.json`` <-> our ``model`` and ``moe`` config sections.

Import reads Llama, Mistral and Mixtral configs, in the layout of transformers 4 (``rope_theta``,
``rope_scaling``) or 5 (``rope_parameters``). Every field is either mapped, known not to change
what the weights compute (listed in ``_NO_EFFECT`` with the reason), or refused by name: a
checkpoint we cannot represent exactly is never imported as something else.
"""
from __future__ import annotations

import json

from btx_jax import paths

LLAMA_TYPES = ("llama", "mistral")  # Mistral is Llama's architecture (its sliding window must be off)
MIXTRAL_TYPES = ("mixtral",)

# Fields that do not change the function the weights compute (or are read elsewhere).
_NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map",
    "torch_dtype", "dtype",              # the storage dtype: import chooses its own param dtype
    "bos_token_id", "eos_token_id", "pad_token_id",  # read by the tokenizer (hf:DIR), not the model
    "max_position_embeddings",           # RoPE has no table: recorded, not a limit here
    "initializer_range",                 # initialisation only (mapped to model.init_std)
    "use_cache", "output_router_logits",  # inference / API options
    "pretraining_tp",                    # a way to split the matmuls on devices: the same numbers
    "router_aux_loss_coef",              # training only (mapped to moe.load_balance_weight)
    "router_jitter_noise",               # training only (mapped to moe.router_jitter)
    "attention_dropout",                 # training only; refused unless 0 (we have no attention dropout)
    "tie_word_embeddings", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",  # mapped below
    "hidden_act", "attention_bias", "mlp_bias", "sliding_window", "layer_types",  # checked below
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "num_local_experts", "num_experts_per_tok",
}
_DEFAULTS = {  # transformers' defaults for fields a config.json may leave out
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class HFError(ValueError):
    """A Hugging Face checkpoint or config we cannot represent; the message names the field."""


def read_config(hf_dir: str) -> dict:
    path = paths.resolve(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{hf_dir} has no config.json\n  fix: point to a Hugging Face model directory "
                      "(config.json + *.safetensors), e.g. one made by huggingface-cli download")
    return json.loads(path.read_text())


def _rope(hf: dict, model_type: str) -> dict:
    """Our rope_* fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (4)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", _DEFAULTS[model_type]["rope_theta"]))
    scaling = params or scaling
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    fields = {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind == "default":
        return fields
    if kind not in ("linear", "llama3"):
        raise HFError(f"config.json: rope scaling type {kind!r} is not supported (we have default, linear, llama3)\n"
                      "  fix: use a checkpoint without that scaling; nothing was written")
    fields.update(rope_scaling=kind, rope_factor=float(scaling.pop("factor")))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(scaling.pop("low_freq_factor")),
                      rope_high_freq_factor=float(scaling.pop("high_freq_factor")),
                      rope_original_max_len=int(scaling.pop("original_max_position_embeddings")))
    if scaling.get("attention_factor", 1.0) in (None, 1.0):
        scaling.pop("attention_factor", None)
    if scaling:
        raise HFError(f"config.json: rope scaling fields {sorted(scaling)} are not supported for {kind!r}")
    return fields


def from_hf(hf: dict, ignore: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """config.json -> (model fields, moe fields, info: bos/eos ids, max_position_embeddings, dtype, kind).

    `ignore` names fields the caller accepts to lose (e.g. ``sliding_window`` when every sequence
    is shorter than the window, where full causal attention is the same function)."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_TYPES + MIXTRAL_TYPES:
        raise HFError(f"config.json: model_type {model_type!r} is not supported\n"
                      f"  fix: import a Llama-family model ({', '.join(LLAMA_TYPES + MIXTRAL_TYPES)})")
    unknown = sorted(k for k in hf if k not in _NO_EFFECT and k not in ignore)
    if unknown:
        raise HFError(f"config.json: fields {unknown} have no equivalent here, so the imported model would compute "
                      "something else\n  fix: if you know they do not matter for your use, pass --ignore_fields="
                      + ",".join(unknown))
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise HFError(f"config.json: required fields {missing} are missing")
    checks = {"hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,),
              "sliding_window": (None,), "attention_dropout": (0, 0.0)}
    for field, allowed in checks.items():
        if field in hf and field not in ignore and hf[field] not in allowed:
            raise HFError(f"config.json: {field}={hf[field]!r} is not supported (we need {allowed[0]!r})"
                          + ("\n  fix: full causal attention equals the sliding window on sequences no longer than "
                             f"{hf[field]}; if yours are, pass --ignore_fields=sliding_window"
                             if field == "sliding_window" else ""))
    if any(t not in ("full_attention", None) for t in hf.get("layer_types") or []) and "layer_types" not in ignore:
        raise HFError(f"config.json: layer_types {sorted(set(hf['layer_types']))}: only full attention is supported")
    heads = hf["num_attention_heads"]
    model = {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
        "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "mlp_dim": hf["intermediate_size"],
        "norm_eps": float(hf.get("rms_norm_eps", _DEFAULTS[model_type]["rms_norm_eps"])),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        **_rope(hf, model_type),
    }
    moe = {"num_experts": 0}
    if model_type in MIXTRAL_TYPES:
        moe = {"num_experts": hf.get("num_local_experts", 8), "top_k": hf.get("num_experts_per_tok", 2),
               "moe_every": 1, "renormalize": True,
               "load_balance_weight": float(hf.get("router_aux_loss_coef", 0.001)),
               "router_jitter": float(hf.get("router_jitter_noise", 0.0) or 0.0)}
    eos = hf.get("eos_token_id")
    info = {"kind": model_type, "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos,
            "max_position_embeddings": hf.get("max_position_embeddings"),
            "dtype": hf.get("dtype") or hf.get("torch_dtype")}
    return model, moe, info


def check_exportable(model: dict, moe: dict) -> None:
    """Refuses what Mixtral cannot express: its router renormalizes the top-k weights, and every layer is MoE."""
    if not moe.get("num_experts"):
        return
    if moe.get("moe_every", 1) != 1:
        raise HFError(f"moe.moe_every={moe['moe_every']}: Mixtral has an MoE FFN in every layer, so a model with "
                      "dense layers in between has no Mixtral equivalent\n  fix: export a model with moe_every=1")
    if moe.get("top_k", 2) == 1:
        raise HFError("moe.top_k=1: Mixtral renormalizes the top-k router weights, so with k=1 its gate is 1.0, "
                      "where ours is the router probability p (Switch); the exported model would compute another "
                      "function\n  fix: export a top_k >= 2 model")
    if not moe.get("renormalize", True):
        raise HFError("moe.renormalize=false: Mixtral always renormalizes the top-k router weights\n"
                      "  fix: export a model trained with moe.renormalize=true")


def to_hf(model: dict, moe: dict, *, dtype: str, bos_token_id, eos_token_id, max_position_embeddings: int) -> dict:
    """Our model/moe sections -> a LlamaForCausalLM or MixtralForCausalLM config.json (transformers 4 layout,
    which transformers 5, vLLM and lm-evaluation-harness all read)."""
    check_exportable(model, moe)
    mixtral = bool(moe.get("num_experts"))
    scaling = None
    if model.get("rope_scaling", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": model["rope_factor"]}
    elif model.get("rope_scaling", "none") == "llama3":
        scaling = {"rope_type": "llama3", "factor": model["rope_factor"],
                   "low_freq_factor": model["rope_low_freq_factor"], "high_freq_factor": model["rope_high_freq_factor"],
                   "original_max_position_embeddings": model["rope_original_max_len"]}
    config = {
        "architectures": ["MixtralForCausalLM" if mixtral else "LlamaForCausalLM"],
        "model_type": "mixtral" if mixtral else "llama",
        "vocab_size": model["vocab_size"], "hidden_size": model["d_model"], "intermediate_size": model["mlp_dim"],
        "num_hidden_layers": model["num_layers"], "num_attention_heads": model["num_heads"],
        "num_key_value_heads": model["num_kv_heads"], "head_dim": model["head_dim"], "hidden_act": "silu",
        "rms_norm_eps": model["norm_eps"], "rope_theta": model["rope_theta"], "rope_scaling": scaling,
        "tie_word_embeddings": bool(model["tie_embeddings"]), "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": model.get("init_std", 0.02), "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype,
    }
    if mixtral:
        config.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                      router_aux_loss_coef=moe.get("load_balance_weight", 0.01), output_router_logits=False,
                      router_jitter_noise=moe.get("router_jitter", 0.0), sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return config

"""Which Hugging Face tensor each of our parameters is, and how the layout changes.

Our layers are stacked on a leading ``layers`` axis (and MoE experts on an ``expert`` axis after
it); Hugging Face stores one tensor per layer (and per expert) as ``[out, in]`` torch Linear
weights. Both use RoPE's rotate-half convention, so the q/k heads need no permutation.

=================================  ============================================================  =========
ours                               Hugging Face ({i}: layer, {e}: expert)                        layout
=================================  ============================================================  =========
embed/embedding [V, D]             model.embed_tokens.weight [V, D]                              same
lm_head/kernel [D, V]              lm_head.weight [V, D] (absent when embeddings are tied)       transpose
final_norm/scale [D]               model.norm.weight                                             same
layers/attn_norm/scale [L, D]      model.layers.{i}.input_layernorm.weight                       same
layers/mlp_norm/scale [L, D]       model.layers.{i}.post_attention_layernorm.weight              same
layers/attn/q/kernel [L, D, H, Dh] model.layers.{i}.self_attn.q_proj.weight [H*Dh, D]            heads_in
layers/attn/{k,v}/kernel           model.layers.{i}.self_attn.{k,v}_proj.weight [K*Dh, D]        heads_in
layers/attn/o/kernel [L, H, Dh, D] model.layers.{i}.self_attn.o_proj.weight [D, H*Dh]            heads_out
layers/mlp/{gate,up}/kernel        model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]             transpose
layers/mlp/down/kernel [L, F, D]   model.layers.{i}.mlp.down_proj.weight [D, F]                  transpose
layers/moe/router/kernel [L, D, E] model.layers.{i}.block_sparse_moe.gate.weight [E, D]          transpose
layers/moe/experts/gate/kernel     model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight       transpose
layers/moe/experts/up/kernel       model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight       transpose
layers/moe/experts/down/kernel     model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight       transpose
=================================  ============================================================  =========
"""
from __future__ import annotations

import dataclasses

import numpy as np

_PREFIX = "model.layers.{i}."
_COMMON = [
    ("embed/embedding", "model.embed_tokens.weight", "same"),
    ("final_norm/scale", "model.norm.weight", "same"),
    ("layers/attn_norm/scale", _PREFIX + "input_layernorm.weight", "same"),
    ("layers/mlp_norm/scale", _PREFIX + "post_attention_layernorm.weight", "same"),
    ("layers/attn/q/kernel", _PREFIX + "self_attn.q_proj.weight", "heads_in"),
    ("layers/attn/k/kernel", _PREFIX + "self_attn.k_proj.weight", "heads_in"),
    ("layers/attn/v/kernel", _PREFIX + "self_attn.v_proj.weight", "heads_in"),
    ("layers/attn/o/kernel", _PREFIX + "self_attn.o_proj.weight", "heads_out"),
]
_DENSE_FFN = [
    ("layers/mlp/gate/kernel", _PREFIX + "mlp.gate_proj.weight", "transpose"),
    ("layers/mlp/up/kernel", _PREFIX + "mlp.up_proj.weight", "transpose"),
    ("layers/mlp/down/kernel", _PREFIX + "mlp.down_proj.weight", "transpose"),
]
_MIXTRAL_FFN = [
    ("layers/moe/router/kernel", _PREFIX + "block_sparse_moe.gate.weight", "transpose"),
    ("layers/moe/experts/gate/kernel", _PREFIX + "block_sparse_moe.experts.{e}.w1.weight", "transpose"),
    ("layers/moe/experts/up/kernel", _PREFIX + "block_sparse_moe.experts.{e}.w3.weight", "transpose"),
    ("layers/moe/experts/down/kernel", _PREFIX + "block_sparse_moe.experts.{e}.w2.weight", "transpose"),
]
# Buffers older checkpoints carry that are recomputed from the config, never weights.
DERIVED = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our params and the Hugging Face tensors it is stacked from."""

    ours: str
    template: str
    layout: str  # same | transpose | heads_in | heads_out
    shape: tuple[int, ...]  # ours, stacked
    layers: int  # 0: not stacked over layers
    experts: int  # 0: not stacked over experts

    def hf_names(self) -> list[tuple[tuple[int, ...], str]]:
        """[(index into our leaf, Hugging Face name)] in layer-major order."""
        if not self.layers:
            return [((), self.template)]
        if not self.experts:
            return [((i,), self.template.format(i=i)) for i in range(self.layers)]
        return [((i, e), self.template.format(i=i, e=e)) for i in range(self.layers) for e in range(self.experts)]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[(1 if self.layers else 0) + (1 if self.experts else 0):]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.slice_shape
        if self.layout == "same":
            return s
        if self.layout == "transpose":
            return s[::-1]
        if self.layout == "heads_in":  # ours [D, N, Dh]
            return (s[1] * s[2], s[0])
        return (s[2], s[0] * s[1])  # heads_out, ours [H, Dh, D]


def table(model: dict, moe: dict) -> list[Entry]:
    """Every param of the model that `model` / `moe` (our config sections, as dicts) describe."""
    v, d, l_, f = model["vocab_size"], model["d_model"], model["num_layers"], model["mlp_dim"]
    h, k, dh = model["num_heads"], model["num_kv_heads"], model["head_dim"]
    e = moe.get("num_experts", 0)
    shapes = {
        "embed/embedding": (v, d), "lm_head/kernel": (d, v), "final_norm/scale": (d,),
        "layers/attn_norm/scale": (l_, d), "layers/mlp_norm/scale": (l_, d),
        "layers/attn/q/kernel": (l_, d, h, dh), "layers/attn/k/kernel": (l_, d, k, dh),
        "layers/attn/v/kernel": (l_, d, k, dh), "layers/attn/o/kernel": (l_, h, dh, d),
        "layers/mlp/gate/kernel": (l_, d, f), "layers/mlp/up/kernel": (l_, d, f), "layers/mlp/down/kernel": (l_, f, d),
        "layers/moe/router/kernel": (l_, d, e), "layers/moe/experts/gate/kernel": (l_, e, d, f),
        "layers/moe/experts/up/kernel": (l_, e, d, f), "layers/moe/experts/down/kernel": (l_, e, f, d),
    }
    rows = _COMMON + (_MIXTRAL_FFN if e else _DENSE_FFN)
    if not model["tie_embeddings"]:
        rows = rows + [("lm_head/kernel", "lm_head.weight", "transpose")]
    return [Entry(ours, template, layout, shapes[ours], l_ if ours.startswith("layers/") else 0,
                  e if "{e}" in template else 0) for ours, template, layout in rows]


def to_ours(x: np.ndarray, entry: Entry) -> np.ndarray:
    """One Hugging Face tensor -> the slice of our leaf at one layer (and expert)."""
    if entry.layout == "same":
        return x
    return x.T.reshape(entry.slice_shape)  # transpose; heads_in [N*Dh, D] -> [D, N, Dh]; heads_out [D, H*Dh] -> [H, Dh, D]


def to_hf(x: np.ndarray, entry: Entry) -> np.ndarray:
    """The slice of our leaf at one layer (and expert) -> the Hugging Face tensor (C-contiguous)."""
    if entry.layout == "same":
        out = x
    elif entry.layout == "transpose":
        out = x.T
    elif entry.layout == "heads_in":  # [D, N, Dh] -> [N*Dh, D]
        out = x.reshape(x.shape[0], -1).T
    else:  # heads_out: [H, Dh, D] -> [D, H*Dh]
        out = x.reshape(-1, x.shape[-1]).T
    return np.ascontiguousarray(out)

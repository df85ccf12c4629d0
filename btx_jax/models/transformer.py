"""Llama-style decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU FFN.

Layers are stacked on a leading ``layers`` axis and applied with ``nnx.scan`` so compile
time does not grow with depth. Parameter paths are a contract with the checkpoint surgeon
(see ``btx_jax/models/README`` in DESIGN.md): the FFN is ``layers/mlp/{gate,up,down}/kernel``.

Axis letters: B batch, T sequence, D model, H query heads, K key/value heads,
G = H / K query heads per key/value head, Dh head dim, F FFN hidden, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btx_jax.models.moe import MoE, MoEConfig
from btx_jax.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # none | linear | llama3 (see rope_frequencies)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per loop iteration; num_layers unrolls the stack completely; 0: auto
    moe: MoEConfig | None = None  # None: every FFN is dense

    @classmethod
    def from_config(cls, model_config, moe_config=None) -> "TransformerConfig":
        return cls(**dict(model_config), moe=MoEConfig.from_config(moe_config))


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
    return nnx.Param(init(rngs.params(), shape, dtype))


class Projection(nnx.Module):
    """A bias-free linear map (its `kernel` carries logical axes), written as an einsum equation.

    ``proj("btd,dhk->bthk", x)`` is ``jnp.einsum`` of x and the kernel, computed as one 2-D matmul
    ``[B*T, in] @ [in, out]``: XLA:CPU runs the weight gradient of the 3-D form (a dot contracting over
    batch *and* time) about 1.5x slower, and the reshapes cost nothing (GSPMD keeps the batch sharding
    on the merged axis, and the tensor sharding on the merged head axis).
    """

    def __init__(self, shape, axes, *, std, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.kernel = _param(rngs, shape, axes, std, cfg.param_dtype)
        self.dtype = cfg.dtype

    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        inputs, output = equation.split("->")
        lhs, rhs = inputs.split(",")
        contracted = len(lhs) - 2
        if lhs[:2] != "bt" or rhs[:contracted] != lhs[2:] or output != "bt" + rhs[contracted:]:
            raise ValueError(f"Projection computes 'bt<in>,<in><out>->bt<out>', not {equation!r}")
        kernel = self.kernel[...].astype(self.dtype)
        out_shape = kernel.shape[contracted:]
        b, t = x.shape[:2]
        y = x.astype(self.dtype).reshape(b * t, -1) @ kernel.reshape(-1, math.prod(out_shape))
        return y.reshape(b, t, *out_shape)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 whatever the compute dtype."""

    def __init__(self, cfg: TransformerConfig):
        init = nnx.with_partitioning(nnx.initializers.ones, ("norm",))
        self.scale = nnx.Param(init(None, (cfg.d_model,), cfg.param_dtype))
        self.eps, self.dtype = cfg.norm_eps, cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(cfg: TransformerConfig) -> np.ndarray:
    """The [Dh/2] rotary frequencies theta^(-2i/Dh), rescaled for long context as configured.

    linear: all divided by `rope_factor` (position interpolation). llama3 (Llama 3.1): wavelengths
    longer than original_max_len / low_freq_factor are divided by the factor, shorter than
    original_max_len / high_freq_factor kept, and those between interpolated smoothly; the same
    formula as Hugging Face's ``_compute_llama3_parameters``, so imported Llama 3 weights match.
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half)
    if cfg.rope_scaling == "linear":
        return (inv_freq / cfg.rope_factor).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        factor, low, high, context = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                      cfg.rope_original_max_len)
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, [B, T, 1, Dh/2] each, computed once per forward for every layer.
    The optimization barrier keeps them materialised: without it XLA fuses the cos and sin into each
    consumer, recomputing them for every head and element of q, k and their gradients in every layer."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return cos[:, :, None, :], sin[:, :, None, :]


def rope(x: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Llama in Hugging Face). x: [B, T, N, Dh]; rotary: rope_tables."""
    cos, sin = rotary
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S]: causal, and a token sees only tokens of its own packed document."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_doc)[:, None, None, :, :]


CAUSAL_BLOCK = 64  # the smallest query block of causal_attention
CAUSAL_BLOCKS = 4  # at most this many blocks (T = 512: 128-row blocks; 256 is as fast, 64 2-3% slower per step)
_MASKED = float(jnp.finfo(jnp.float32).min)


def attend(q, k, v, mask):
    """Grouped-query attention in head-major layout: q [B, K, G, T, Dh] (already scaled), k/v [B, K, S, Dh],
    mask [B, 1, 1, T, S] -> [B, K, G, T, Dh]. The softmax's normalisation is applied to the output,
    out = (exp(s - max) @ v) / sum(exp(s - max)), dividing the [.., T, Dh] output instead of the [.., T, S]
    probabilities; each K/V head is shared by its group of query heads without copies. Scores and softmax
    in float32; every query row must see at least one key (the causal diagonal)."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, _MASKED)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / jnp.sum(weights, axis=-1, keepdims=True)


def causal_attention(q, k, v, mask, block: int | None = None):
    """Causal grouped-query attention, q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, 1, T, S] -> [B, T, H, Dh],
    that skips the key blocks the causal mask hides: query block i attends only to keys [0, (i + 1) * block),
    so a T = 4 * block sequence computes 10/16 of the scores. The hidden keys have weight exactly 0 in the
    full softmax, so the result is the same. `block`: by default T / 4, at least 64.

    q, k and v are transposed to head-major [B, K, (G,) T, Dh] once, so that every block's matmuls read
    contiguous [block, Dh] tiles per head, and cut into blocks by splits, whose gradient is one concatenation
    (a slice's gradient is a zero-padded copy, summed over the blocks). Fwd+bwd at DENSE_BENCH's shape this
    is 1.5-1.7x faster than slicing 64-row blocks in the [B, T, H, Dh] layout (README "Benchmark")."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    block = block or max(CAUSAL_BLOCK, t // CAUSAL_BLOCKS)
    q = (q * (dh ** -0.5)).reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = mask[:, :, None]
    if t < 2 * block or t % block:
        out = attend(q, k, v, mask)
    else:  # split, not sliced: a split's gradient is one concatenation, a slice's a zero-padded copy per block
        n = t // block
        qs, ks, vs = jnp.split(q, n, axis=3), jnp.split(k, n, axis=2), jnp.split(v, n, axis=2)
        out = jnp.concatenate([attend(qs[i], jnp.concatenate(ks[:i + 1], axis=2), jnp.concatenate(vs[:i + 1], axis=2),
                                      mask[..., i * block:(i + 1) * block, :(i + 1) * block]) for i in range(n)], axis=3)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; softmax in float32."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d, h, k, dh, std = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std
        self.q = Projection((d, h, dh), ("embed", "heads", "head_dim"), std=std, cfg=cfg, rngs=rngs)
        self.k = Projection((d, k, dh), ("embed", "kv_heads", "head_dim"), std=std, cfg=cfg, rngs=rngs)
        self.v = Projection((d, k, dh), ("embed", "kv_heads", "head_dim"), std=std, cfg=cfg, rngs=rngs)
        self.o = Projection((h, dh, d), ("heads", "head_dim", "embed"), std=std, cfg=cfg, rngs=rngs)

    def __call__(self, x, segment_ids, rotary):
        q = rope(self.q("btd,dhk->bthk", x), rotary)
        k = rope(self.k("btd,dnk->btnk", x), rotary)
        v = self.v("btd,dnk->btnk", x)
        q = constrain(q, "batch", "length", "act_heads", None)
        return self.o("bthk,hkd->btd", causal_attention(q, k, v, attention_mask(segment_ids)[:, 0]))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.mlp_dim, cfg.init_std
        self.gate = Projection((d, f), ("embed", "mlp"), std=std, cfg=cfg, rngs=rngs)
        self.up = Projection((d, f), ("embed", "mlp"), std=std, cfg=cfg, rngs=rngs)
        self.down = Projection((f, d), ("mlp", "embed"), std=std, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.silu(self.gate("btd,df->btf", x)) * self.up("btd,df->btf", x)
        return self.down("btf,fd->btd", constrain(h, "batch", "length", "act_mlp"))


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is `mlp` or `moe`.

    Returns the new residual stream and the MoE layer's router losses and metrics ({} if dense).
    """

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, *, moe: bool = False):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        if moe:
            self.moe = MoE(cfg.moe, cfg.d_model, cfg.mlp_dim, std=cfg.init_std, param_dtype=cfg.param_dtype,
                           dtype=cfg.dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs)

    def __call__(self, x, segment_ids, rotary, *, train: bool = False, rng=None, probe: bool = False,
                 router_bias=None, expert_keep=None):
        """`rotary`: the rope_tables of the tokens' positions."""
        x = x + self.attn(self.attn_norm(x), segment_ids, rotary)
        aux = {}
        if hasattr(self, "moe"):
            y, aux = self.moe(self.mlp_norm(x), segment_ids, train=train, rng=rng, probe=probe, router_bias=router_bias,
                              expert_keep=expert_keep)
        else:
            y = self.mlp(self.mlp_norm(x))
        return constrain(x + y, "batch", "length", "act_embed"), aux


AUTO_UNROLL_MAX_LAYERS = 16


def scan_unroll(cfg: TransformerConfig) -> int:
    """cfg.scan_unroll, with 0 (auto) = the whole stack on CPU up to AUTO_UNROLL_MAX_LAYERS layers, else 1.
    On CPU the backward pass through the layer loop copies each layer's gradients and residuals in and out
    of the stacked buffers; unrolled, XLA writes them in place. On accelerators the loop keeps compile time
    flat in depth, which matters more."""
    if cfg.scan_unroll:
        return cfg.scan_unroll
    return cfg.num_layers if jax.default_backend() == "cpu" and cfg.num_layers <= AUTO_UNROLL_MAX_LAYERS else 1


def _stack(make, count: int, rngs: nnx.Rngs):
    """`count` modules stacked on a leading `layers` axis (for nnx.scan)."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)
    return build(rngs)


class Transformer(nnx.Module):
    """Token ids [B, T] -> (next-token logits [B, T, V] float32, per-layer MoE aux {name: [L_moe, ...]}).

    Dense: ``layers`` holds L blocks. MoE with ``moe_every = k``: ``layers`` holds the L / k MoE
    blocks and, for k > 1, ``dense_layers`` [L / k, k - 1] the dense blocks that precede each.
    """

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.with_partitioning(nnx.initializers.normal(cfg.init_std), ("vocab", "embed"))
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init,
                               param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)

        if cfg.moe is None:
            self.layers = _stack(lambda r: Block(cfg, r), cfg.num_layers, rngs)
        else:
            every = cfg.moe.moe_every
            self.layers = _stack(lambda r: Block(cfg, r, moe=True), cfg.num_layers // every, rngs)
            if every > 1:
                self.dense_layers = _stack(lambda r: _stack(lambda r2: Block(cfg, r2), every - 1, r),
                                           cfg.num_layers // every, rngs)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Projection((cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                      std=cfg.init_std, cfg=cfg, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, positions=None, *, train: bool = False, rng=None, probe: bool = False,
                 router_bias=None, expert_keep=None):
        """`train` selects the training capacity factor, router jitter and expert dropout (which need `rng`);
        `probe` adds each MoE layer's router-input sums to the aux (see MoE); `router_bias` [L_moe, E] is the
        MoE layers' selection bias (moe.balance="bias", kept in the train state; None: none); `expert_keep`
        [E] bool masks experts in every MoE layer as an input (see MoE; None: only moe.masked_experts)."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(self.embed(tokens), "batch", "length", "act_embed")
        rng = jax.random.key(0) if rng is None else rng
        rotary = rope_tables(positions, rope_frequencies(self.cfg))
        x, aux = self._apply_layers(x, segment_ids, rotary, train, rng, probe, router_bias, expert_keep)
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head("btd,dv->btv", x)
        return constrain(logits.astype(jnp.float32), "batch", "length", "act_vocab"), aux

    def _apply_layers(self, x, segment_ids, rotary, train, rng, probe, router_bias, expert_keep):
        """The layer stack as scans; `router_bias` [L_moe, E] (or None) is scanned alongside the MoE blocks,
        `expert_keep` (the same for every layer) is closed over."""
        cfg = self.cfg

        def scan_blocks(x, blocks, keys, unroll, bias=None):
            def apply_block(x, block, key, bias):
                return block(x, segment_ids, rotary, train=train, rng=key, probe=probe, router_bias=bias,
                             expert_keep=expert_keep)

            if cfg.remat != "none":
                apply_block = nnx.remat(apply_block, policy=_REMAT_POLICIES[cfg.remat])
            scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), unroll=unroll,
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(x, blocks, keys, bias)

        count = cfg.num_layers if cfg.moe is None else cfg.num_layers // cfg.moe.moe_every
        keys = jax.random.split(rng, count)
        if cfg.moe is None or cfg.moe.moe_every == 1:
            return scan_blocks(x, self.layers, keys, scan_unroll(cfg), router_bias)

        def apply_group(x, moe_block, dense_blocks, key, bias):
            x, _ = scan_blocks(x, dense_blocks, jax.random.split(key, cfg.moe.moe_every - 1), 1)
            return moe_block(x, segment_ids, rotary, train=train, rng=key, probe=probe, router_bias=bias,
                             expert_keep=expert_keep)

        scan = nnx.scan(apply_group, in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        return scan(x, self.layers, self.dense_layers, keys, router_bias)

"""The Flax decoder against an independent float64 numpy implementation written from the math.

The reference below shares no code with ``btx_jax.models.transformer``: RMSNorm, rotary
embedding (as complex multiplication of the (i, i + Dh/2) pairs), grouped-query attention
with causal and same-document masks, SwiGLU, and the tied / untied output heads are all
re-derived here. Parameters are randomised at O(1) scale (norm scales away from 1) so that
attention is far from uniform and a missing scale, a wrong head grouping or a wrong mask
changes the logits by far more than the tolerance.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from btx_jax.models.transformer import Transformer, TransformerConfig

V, D, L, DH, F, T = 64, 32, 2, 8, 48, 16


def make_cfg(**overrides) -> TransformerConfig:
    base = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=4, num_kv_heads=2, head_dim=DH, mlp_dim=F)
    base.update(overrides)
    return TransformerConfig(**base)


@functools.lru_cache(maxsize=None)
def graphdef_and_shapes(cfg: TransformerConfig):
    """The model's graphdef and parameter shapes, built abstractly on one device (no mesh)."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def build(cfg: TransformerConfig, seed: int = 0):
    """(graphdef, float32 params as a pure nested dict) for a model built on one device."""
    graphdef, shapes = graphdef_and_shapes(cfg)
    return graphdef, randomize(shapes, seed)


def randomize(params: dict, seed: int) -> dict:
    """O(1)-scale weights: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        shape = tuple(x.shape)
        if name == "scale":
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name == "embedding":
            value = rng.normal(0.0, 1.0, size=shape)
        else:  # kernel: fan-in is every axis except the output ones
            stacked = path[0].key == "layers"
            core = shape[1:] if stacked else shape
            in_axes = {"o": 2, "down": 1, "lm_head": 1}
            owner = path[-2].key
            fan_in = int(np.prod(core[: in_axes.get(owner, 1)]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape)
        return jnp.asarray(value, dtype=x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
    return jax.jit(lambda params, tokens, seg, pos: nnx.merge(graphdef, params)(tokens, seg, pos)[0])


def forward(graphdef, params, tokens, segment_ids=None, positions=None):
    """Logits of the Flax model (jitted; graphdef closed over as a static)."""
    tokens = jnp.asarray(tokens)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    pos = None if positions is None else jnp.asarray(positions)
    return _jitted_forward(graphdef)(params, tokens, seg, pos)


# ----------------------------------------------------------------------------- numpy reference


def ref_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x, positions, theta):
    """Pairs (x_i, x_{i+Dh/2}) rotated by angle pos * theta^(-2i/Dh), as z = x_i + j x_{i+Dh/2}."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angle = positions[:, :, None, None].astype(np.float64) * freqs  # [B, T, 1, Dh/2]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_silu(x):
    return x / (1.0 + np.exp(-x))


def ref_softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def ref_logits(p, cfg: TransformerConfig, tokens, segment_ids=None, positions=None):
    """float64 decoder from the math. p: the model's parameter dict (any array type)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    h_q, h_kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = h_q // h_kv
    # allowed[b, i, j]: query i may read key j (j <= i and same document)
    allowed = (np.arange(t)[None, :, None] >= np.arange(t)[None, None, :]) & (seg[:, :, None] == seg[:, None, :])

    x = p["embed"]["embedding"][tokens]  # [B, T, D]
    lp = p["layers"]
    for layer in range(cfg.num_layers):
        h = ref_rmsnorm(x, lp["attn_norm"]["scale"][layer], cfg.norm_eps)
        wq, wk, wv = (lp["attn"][n]["kernel"][layer] for n in ("q", "k", "v"))
        q = ref_rope(np.einsum("btd,dhe->bthe", h, wq), pos, cfg.rope_theta)
        k = ref_rope(np.einsum("btd,dhe->bthe", h, wk), pos, cfg.rope_theta)
        v = np.einsum("btd,dhe->bthe", h, wv)
        heads = []
        for head in range(h_q):
            kv = head // group  # query heads [kv*G, (kv+1)*G) share key/value head kv
            s = np.einsum("bie,bje->bij", q[:, :, head], k[:, :, kv]) / np.sqrt(dh)
            heads.append(np.einsum("bij,bje->bie", ref_softmax(s, allowed), v[:, :, kv]))
        attn = np.stack(heads, axis=2)  # [B, T, H, Dh]
        x = x + np.einsum("bthe,hed->btd", attn, lp["attn"]["o"]["kernel"][layer])
        h = ref_rmsnorm(x, lp["mlp_norm"]["scale"][layer], cfg.norm_eps)
        gate = h @ lp["mlp"]["gate"]["kernel"][layer]
        up = h @ lp["mlp"]["up"]["kernel"][layer]
        x = x + (ref_silu(gate) * up) @ lp["mlp"]["down"]["kernel"][layer]
    x = ref_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


def packed_batch(seed: int = 0):
    """Two rows of length T: row 0 packs 3 documents + padding, row 1 packs 2 documents + padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(2, T)).astype(np.int32)
    lengths = [[5, 4, 4], [7, 6]]  # padding (segment 0) fills the rest of each row
    seg = np.zeros((2, T), np.int32)
    pos = np.zeros((2, T), np.int32)
    for row, docs in enumerate(lengths):
        start = 0
        for doc, n in enumerate(docs, start=1):
            seg[row, start:start + n] = doc
            pos[row, start:start + n] = np.arange(n)
            start += n
        assert start < T  # trailing padding present
    return tokens, seg, pos


def assert_matches_reference(cfg, graphdef, params, *inputs):
    got = np.asarray(forward(graphdef, params, *inputs))
    want = ref_logits(params, cfg, *inputs)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.abs(got - want).max()
    print(f"max |flax - numpy| = {diff:.3e} (max |logit| = {np.abs(want).max():.2f})")
    # the logits must be non-trivial for the comparison to mean anything
    assert np.abs(want).max() > 1.0 and want.std() > 0.3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return diff


# ----------------------------------------------------------------------------- tests


def test_param_tree_layout():
    """Guards the parameter-path/shape contract the reference (and the checkpoint surgeon) rely on."""
    _, p = build(make_cfg())
    shapes = jax.tree.map(lambda a: tuple(a.shape), p)
    assert shapes == {
        "embed": {"embedding": (V, D)},
        "final_norm": {"scale": (D,)},
        "lm_head": {"kernel": (D, V)},
        "layers": {
            "attn": {"q": {"kernel": (L, D, 4, DH)}, "k": {"kernel": (L, D, 2, DH)},
                     "v": {"kernel": (L, D, 2, DH)}, "o": {"kernel": (L, 4, DH, D)}},
            "attn_norm": {"scale": (L, D)}, "mlp_norm": {"scale": (L, D)},
            "mlp": {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)}, "down": {"kernel": (L, F, D)}},
        },
    }
    _, tied = build(make_cfg(tie_embeddings=True))
    assert "lm_head" not in tied


def test_reference_rope_is_rotate_half():
    """Guards the reference itself: its complex-number RoPE equals the rotate-half formula."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, DH))
    pos = np.array([[0, 1, 7]])
    half = DH // 2
    ang = pos[0, :, None, None] * 10_000.0 ** (-np.arange(half) / half)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], -1)
    np.testing.assert_allclose(ref_rope(x, pos, 10_000.0), x * cos + rotate_half * sin, atol=1e-12)
    np.testing.assert_allclose(ref_rope(x, pos, 10_000.0)[:, 0], x[:, 0], atol=1e-12)  # position 0: identity


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_match_reference_unpacked(num_kv_heads):
    """Guards RMSNorm (with scale), RoPE, causal GQA head grouping, SwiGLU and the untied head."""
    cfg = make_cfg(num_kv_heads=num_kv_heads)
    graphdef, params = build(cfg, seed=num_kv_heads)
    tokens = np.random.default_rng(1).integers(0, V, size=(2, T)).astype(np.int32)
    assert_matches_reference(cfg, graphdef, params, tokens)


def test_logits_match_reference_tied_embeddings():
    """Guards the tied head: logits = final_norm(x) @ embedding.T, with no lm_head parameter."""
    cfg = make_cfg(tie_embeddings=True)
    graphdef, params = build(cfg, seed=3)
    tokens = np.random.default_rng(2).integers(0, V, size=(2, T)).astype(np.int32)
    assert_matches_reference(cfg, graphdef, params, tokens)


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_match_reference_packed(num_kv_heads):
    """Guards same-segment masking and per-document positions on packed rows with trailing padding."""
    cfg = make_cfg(num_kv_heads=num_kv_heads)
    graphdef, params = build(cfg, seed=10 + num_kv_heads)
    tokens, seg, pos = packed_batch(seed=4)
    assert_matches_reference(cfg, graphdef, params, tokens, seg, pos)
    # and the packed result differs from treating the row as one document (the masks matter)
    unpacked = np.asarray(forward(graphdef, params, tokens))
    packed = np.asarray(forward(graphdef, params, tokens, seg, pos))
    assert np.abs(unpacked - packed).max() > 1e-2


def test_norm_scales_matter():
    """Guards the test set-up: changing a norm scale changes the logits (so a dropped scale is caught)."""
    cfg = make_cfg()
    graphdef, params = build(cfg, seed=5)
    tokens = np.random.default_rng(5).integers(0, V, size=(2, T)).astype(np.int32)
    base = np.asarray(forward(graphdef, params, tokens))
    for path in (("layers", "attn_norm"), ("layers", "mlp_norm"), ("final_norm",)):
        p2 = jax.tree.map(lambda a: a, params)
        node = p2
        for key in path:
            node = node[key]
        node["scale"] = jnp.ones_like(node["scale"])
        changed = np.asarray(forward(graphdef, p2, tokens))
        assert np.abs(changed - base).max() > 1e-2, path
        np.testing.assert_allclose(changed, ref_logits(p2, cfg, tokens), rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def _jitted_grad(graphdef):
    """jit of (grad of sum(log_softmax(logits) * weights) w.r.t. the pure-dict params, logits)."""
    def loss(params, tokens, seg, pos, weights):
        logits, _ = nnx.merge(graphdef, params)(tokens, seg, pos)
        return jnp.sum(jax.nn.log_softmax(logits, axis=-1) * weights), logits

    return jax.jit(jax.grad(loss, has_aux=True))


@functools.lru_cache(maxsize=None)
def grad_problem():
    """Params, packed inputs, loss weights and the remat='none' gradients, shared by the gradient tests."""
    cfg = make_cfg()
    graphdef, params = build(cfg, seed=6)
    tokens, seg, pos = packed_batch(seed=6)
    weights = np.random.default_rng(6).normal(size=(2, T, V))
    inputs = (jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(weights, jnp.float32))
    grads, logits = _jitted_grad(graphdef)(params, *inputs)
    return cfg, graphdef, params, (tokens, seg, pos, weights), inputs, grads, logits


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_logits_and_grads(remat):
    """Guards rematerialisation: it must change memory use only, not logits or parameter gradients."""
    cfg, graphdef, params, _, inputs, grads, logits = grad_problem()
    graphdef_remat, _ = build(dataclasses.replace(cfg, remat=remat))
    assert graphdef_remat != graphdef  # really a different (remat) model

    grads_remat, logits_remat = _jitted_grad(graphdef_remat)(params, *inputs)
    np.testing.assert_allclose(np.asarray(logits_remat), np.asarray(logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), ref_logits(params, cfg, *inputs[:3]), rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(grads_remat) == jax.tree.structure(params)
    worst = 0.0
    for (path, g), gr in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_remat)):
        g, gr = np.asarray(g), np.asarray(gr)
        assert np.abs(g).max() > 0, path  # every parameter gets a gradient
        worst = max(worst, float(np.abs(g - gr).max()))
        np.testing.assert_allclose(gr, g, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    print(f"remat={remat}: max |logit diff| = {np.abs(logits - logits_remat).max():.3e}, "
          f"max |grad diff| = {worst:.3e}")


def test_gradients_match_reference_finite_difference():
    """Guards the backward pass: a directional derivative of the loss matches float64 numpy finite differences."""
    cfg, _, params, (tokens, seg, pos, weights), _, grads, _ = grad_problem()
    rng = np.random.default_rng(8)
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), params)

    def ref_loss(p):
        logits = ref_logits(p, cfg, tokens, seg, pos)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top
        return float(np.sum((logits - logz) * weights))

    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = 1e-5
    plus = ref_loss(jax.tree.map(lambda a, d: a + eps * d, p64, direction))
    minus = ref_loss(jax.tree.map(lambda a, d: a - eps * d, p64, direction))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d))
                   for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    print(f"directional derivative: flax {analytic:.6f} vs numpy finite difference {numeric:.6f}")
    assert abs(numeric) > 1.0
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric)


def test_bfloat16_compute_close_to_float32():
    """Guards the bf16 compute path: it runs, keeps float32 params and float32 logits, and stays near fp32."""
    cfg = make_cfg()
    graphdef, params = build(cfg, seed=9)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    graphdef16, shapes16 = graphdef_and_shapes(cfg16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes16))  # params stay float32
    tokens, seg, pos = packed_batch(seed=9)
    want = np.asarray(forward(graphdef, params, tokens, seg, pos))
    got = np.asarray(forward(graphdef16, params, tokens, seg, pos))
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    abs_err = np.abs(got - want).max()
    rel_err = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"bf16 vs fp32: max abs {abs_err:.3e}, relative (Frobenius) {rel_err:.3e}, max |logit| {np.abs(want).max():.2f}")
    assert rel_err < 0.03
    assert abs_err < 0.05 * np.abs(want).max()
    assert abs_err > 0  # bf16 really was used
    # same argmax almost everywhere
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def _numpy_attention(q, k, v, mask, cotangent=None):
    """float64 reference: softmax(q k^T / sqrt(Dh), masked) v for each query head, K/V repeated per group;
    with `cotangent` (dL/dout) also (dL/dq, dL/dk, dL/dv) by the analytic softmax gradient
    dS = P * (dP - rowsum(dP * P)), the K/V gradients summed over each group's query heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    kv_heads = k.shape[2]
    group = q.shape[2] // kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = 1 / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask), np.einsum("bthd,bshd->bhts", q, k) * scale, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    probs = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v)
    if cotangent is None:
        return out
    d_out = np.asarray(cotangent, np.float64)
    d_probs = np.einsum("bthd,bshd->bhts", d_out, v)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", d_scores, k) * scale
    dk = np.einsum("bhts,bthd->bshd", d_scores, q) * scale
    dv = np.einsum("bhts,bthd->bshd", probs, d_out)
    b, t = dk.shape[:2]
    per_group = (b, t, kv_heads, group, dk.shape[-1])
    return out, (dq, dk.reshape(per_group).sum(3), dv.reshape(per_group).sum(3))


def test_causal_attention_and_its_gradient_match_numpy():
    """`causal_attention` (query block i attends to keys [0, (i+1) * block) only; the softmax's
    normalisation applied to the output) on packed rows (several documents and padding) with GQA:
    equal to float64 numpy masked attention over all keys, and so is its gradient (the analytic softmax
    gradient in numpy; ``jax.nn.dot_product_attention``'s as a second reference), for several blocks
    and none (64 % 48)."""
    from btx_jax.models.transformer import attention_mask, causal_attention

    rng = np.random.default_rng(0)
    b, t, h, kv, dh = 2, 64, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, dh)), jnp.float32) for n in (h, kv, kv))
    segment_ids = np.zeros((b, t), np.int32)
    segment_ids[0, :20], segment_ids[0, 20:50] = 1, 2  # two documents, then padding
    segment_ids[1, :] = 1
    mask = attention_mask(jnp.asarray(segment_ids))[:, 0]
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
    want, numpy_grads = _numpy_attention(q, k, v, mask, cotangent)

    def output_and_grads(attention):
        def weighted_sum(q, k, v):
            out = attention(q, k, v)
            return jnp.sum(out * cotangent), out
        grads, out = jax.jit(jax.grad(weighted_sum, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    _, xla_grads = output_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"))
    for xla, expected in zip(xla_grads, numpy_grads):  # the reference itself agrees with the analytic gradient
        np.testing.assert_allclose(xla, expected, atol=2e-5)
    for block in (8, 16, 32, 48):
        out, got_grads = output_and_grads(lambda q, k, v: causal_attention(q, k, v, mask, block=block))
        np.testing.assert_allclose(out, want, atol=2e-6)
        for got, expected in zip(got_grads, numpy_grads):
            np.testing.assert_allclose(got, expected, atol=2e-5)

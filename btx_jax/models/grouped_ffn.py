"""A grouped SwiGLU FFN over expert-sorted row blocks: the dropless MoE's compute on CPU.

`jax.lax.ragged_dot` lowers natively only on TPU/GPU; on CPU it is masked-dense (every
expert multiplies every row). Here rows are sorted by expert and each expert's rows are
padded to whole blocks, so one loop over blocks does one [block, D] x [D, F] matmul with
that block's expert weights, and skips the blocks left empty. The backward pass is written
by hand so that the weight gradients accumulate in place (``dW.at[e].add``) instead of
materializing an [E, D, F] cotangent per block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _block_forward(x, wg, wu, wd):
    g, u = x @ wg, x @ wu
    return jax.nn.silu(g) * u @ wd, g, u


@jax.custom_vjp
def grouped_ffn(x_blocks, block_expert, block_used, w_gate, w_up, w_down):
    """x_blocks [NB, b, D], block_expert [NB] int, block_used [NB] bool, W [E, D, F] / [E, F, D] -> [NB, b, D]."""
    return _forward(x_blocks, block_expert, block_used, w_gate, w_up, w_down)[0]


def _forward(x_blocks, block_expert, block_used, w_gate, w_up, w_down):
    f = w_gate.shape[-1]

    def body(_, xs):
        x, e, used = xs
        zeros = (jnp.zeros((x.shape[0], w_down.shape[-1]), x.dtype), jnp.zeros((x.shape[0], f), x.dtype),
                 jnp.zeros((x.shape[0], f), x.dtype))
        out = jax.lax.cond(used, lambda: _block_forward(x, w_gate[e], w_up[e], w_down[e]), lambda: zeros)
        return None, out

    _, (y, g, u) = jax.lax.scan(body, None, (x_blocks, block_expert, block_used))
    return y, (x_blocks, block_expert, block_used, w_gate, w_up, w_down, g, u)


def _backward(residuals, dy_blocks):
    x_blocks, block_expert, block_used, w_gate, w_up, w_down, g_pre, u_pre = residuals

    def body(grads, xs):
        x, e, used, dy, g, u = xs

        def step(grads):
            dwg, dwu, dwd = grads
            sig = jax.nn.sigmoid(g)
            sg = g * sig
            dh = dy @ w_down[e].T
            dwd = dwd.at[e].add((sg * u).T @ dy)
            dg = dh * u * sig * (1 + g * (1 - sig))
            du = dh * sg
            dwg, dwu = dwg.at[e].add(x.T @ dg), dwu.at[e].add(x.T @ du)
            return (dwg, dwu, dwd), dg @ w_gate[e].T + du @ w_up[e].T

        return jax.lax.cond(used, step, lambda grads: (grads, jnp.zeros_like(x)), grads)

    zeros = (jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    (dwg, dwu, dwd), dx = jax.lax.scan(body, zeros, (x_blocks, block_expert, block_used, dy_blocks, g_pre, u_pre))
    return dx, None, None, dwg, dwu, dwd


grouped_ffn.defvjp(_forward, _backward)

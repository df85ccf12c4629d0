"""The MoE feed-forward layer: a float32 router, top-k with capacity, and a chosen dispatcher.

Parameters (a contract with the checkpoint surgeon, parallel to the dense FFN
``mlp/{gate,up,down}/kernel``): ``moe/router/kernel`` [D, E] and
``moe/experts/{gate,up}/kernel`` [E, D, F], ``moe/experts/down/kernel`` [E, F, D]; with the
layer stack in front, [L, E, D, F]. Expert e is a dense SwiGLU FFN of width F.

The selection bias of ``balance="bias"`` is not a parameter: it is trained by a rule, not by the
optimizer, so it lives in the train state (``state["router_bias"]`` [L, E]) and comes in as a call
argument; params, the surgeon's checkpoints and ``init_from`` never see it.

``masked_experts`` (comma-separated indices) opts experts out without touching the checkpoint: the
router never chooses them (see :func:`btx_jax.models.router.route`), capacity is planned for the
experts left, and the balancing losses are scaled to them, so the layer equals the same MoE with
those experts' weights and router columns removed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from btx_jax.models import dispatch, router


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int = 2
    moe_every: int = 1
    dispatcher: str = "einsum"
    renormalize: bool = True
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    group_size: int = 256
    priority: str = "token"
    router_jitter: float = 0.0
    router_init_std: float = 0.02
    expert_dropout: float = 0.0
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    balance: str = "aux"
    bias_rate: float = 0.003
    grouped_impl: str = "auto"
    grouped_block: int = 256
    masked_experts: str = ""

    @property
    def masked(self) -> tuple[int, ...]:
        """The opted-out experts' indices, sorted (``masked_experts`` "0,3" -> (0, 3); "" -> ())."""
        return masked_indices(self.masked_experts)

    @classmethod
    def from_config(cls, moe_config) -> "MoEConfig | None":
        """None for a dense model (num_experts == 0)."""
        if moe_config is None or moe_config.num_experts == 0:
            return None
        return cls(**dict(moe_config))


def masked_indices(spec: str) -> tuple[int, ...]:
    """"2, 0" -> (0, 2): the expert indices of a ``moe.masked_experts`` value (validated in btx_jax.config)."""
    return tuple(sorted({int(item) for item in str(spec).split(",") if item.strip()}))


class Weight(nnx.Module):
    """One stacked weight, held as ``kernel`` so paths read ``experts/gate/kernel`` like the dense FFN."""

    def __init__(self, shape, axes, std: float, dtype, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
        self.kernel = nnx.Param(init(rngs.params(), shape, dtype))


class Experts(nnx.Module):
    """E SwiGLU FFNs stacked on a leading expert axis."""

    def __init__(self, num_experts: int, d_model: int, mlp_dim: int, *, std: float, dtype, rngs: nnx.Rngs):
        e, d, f = num_experts, d_model, mlp_dim
        self.gate = Weight((e, d, f), ("expert", "embed", "mlp"), std, dtype, rngs)
        self.up = Weight((e, d, f), ("expert", "embed", "mlp"), std, dtype, rngs)
        self.down = Weight((e, f, d), ("expert", "mlp", "embed"), std, dtype, rngs)

    def weights(self) -> dict[str, jax.Array]:
        return {"gate": self.gate.kernel[...], "up": self.up.kernel[...], "down": self.down.kernel[...]}


class MoE(nnx.Module):
    """x [B, T, D] -> (y [B, T, D], per-layer router losses and metrics)."""

    def __init__(self, cfg: MoEConfig, d_model: int, mlp_dim: int, *, std: float, param_dtype, dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.router = Weight((d_model, cfg.num_experts), ("embed", None), cfg.router_init_std, param_dtype, rngs)
        self.experts = Experts(cfg.num_experts, d_model, mlp_dim, std=std, dtype=param_dtype, rngs=rngs)

    def __call__(self, x, segment_ids, *, train: bool = False, rng: jax.Array | None = None, probe: bool = False,
                 router_bias: jax.Array | None = None, expert_keep: jax.Array | None = None):
        """`probe` adds ``router_input_sum`` [D] and ``router_input_count`` (over non-padding tokens) to
        the aux: the surgeon's centroid router initialisation reads the mean router input from them.
        `router_bias` [E]: this layer's selection bias (balance="bias"; None: no bias). `expert_keep` [E]
        bool: ``masked_experts`` as an input (False: masked), dropless only (capacity is planned from a
        static count of experts)."""
        cfg = self.cfg
        if expert_keep is not None and cfg.dispatcher != "dropless":
            raise ValueError(f"expert_keep needs the dropless dispatcher (capacity is static), not {cfg.dispatcher!r}")
        b, t, d = x.shape
        s = min(cfg.group_size, t)
        groups = x.reshape(b * t // s, s, d)
        mask = (segment_ids != 0).reshape(b * t // s, s)
        jitter_rng, dropout_rng = jax.random.split(rng) if rng is not None else (None, None)
        keep = None  # the input mask together with the config's
        if expert_keep is not None:
            keep = jnp.logical_and(expert_keep, router.kept_experts(cfg.num_experts, cfg.masked))
        routing = router.route(groups, self.router.kernel[...], mask, top_k=cfg.top_k, renormalize=cfg.renormalize,
                               jitter=cfg.router_jitter if train else 0.0, rng=jitter_rng, bias=router_bias,
                               masked=cfg.masked, keep=keep)
        # the experts a token can go to
        active = cfg.num_experts - len(cfg.masked) if keep is None else jnp.sum(keep)
        kwargs = dict(dtype=self.dtype)
        if cfg.dispatcher == "dropless":
            kept = jnp.broadcast_to(mask[..., None], routing.experts.shape)
        else:
            capacity = router.capacity(s, active, cfg.top_k,
                                       cfg.train_capacity_factor if train else cfg.eval_capacity_factor)
            position = router.slot_positions(routing, cfg.num_experts, cfg.priority)
            kept = position < capacity
            kwargs.update(position=position, capacity=capacity)
        if cfg.dispatcher in ("dropless", "alltoall"):
            kwargs.update(impl=cfg.grouped_impl, block=cfg.grouped_block)
        if train and cfg.expert_dropout > 0.0:
            kwargs.update(dropout=cfg.expert_dropout, rng=dropout_rng)
        y = dispatch.DISPATCHERS[cfg.dispatcher](groups, routing, kept, self.experts.weights(), **kwargs)
        aux = router.router_losses(routing, cfg.num_experts) | router.router_metrics(routing, kept, cfg.num_experts)
        if cfg.balance == "sequence":
            aux["sequence_balance_loss"] = router.sequence_balance_loss(routing, cfg.num_experts, b)
        if keep is not None or active < cfg.num_experts:  # E sum f p over the E - m left: uniform reads 1
            for name in ("load_balance_loss", "sequence_balance_loss"):
                if name in aux:
                    aux[name] = aux[name] * (active / cfg.num_experts)
        if probe:
            m = mask.astype(jnp.float32)
            aux |= {"router_input_sum": jnp.einsum("gsd,gs->d", groups.astype(jnp.float32), m),
                    "router_input_count": m.sum()}
        return y.reshape(b, t, d), aux

"""The router's kernel before MoE finetuning: normal, zeros (near-uniform) or centroid."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from btx_jax.mix.plan import LeafPlan, MixError, paths

ZEROS_ROUTER_SCALE = 1e-3  # router_init=zeros: kernel std = router_std * this


def initial_router(plan: LeafPlan, mix, rng: np.random.Generator) -> np.ndarray:
    """The router kernel as first written.

    normal: normal(0, router_std). zeros: near-uniform routing, normal(0, router_std * 1e-3), not
    an exact zero: a zero kernel ties every probability and ``jax.lax.top_k`` breaks ties by
    index, so every token would go to experts 0..k-1. With unit-RMS router inputs the logits
    have std ~ router_std * 1e-3 * sqrt(D) (1.6e-4 at D=64, 2e-3 at D=8192 with router_std 0.02):
    the probabilities are 1/E to about that relative precision, while the top-k choice varies from
    token to token. centroid: exact zeros, a placeholder that ``centroid_router`` overwrites once the
    rest of the merged model is written.
    """
    if mix.router_init == "normal":
        return (rng.standard_normal(plan.shape, dtype=np.float32) * mix.router_std).astype(plan.dtype)
    if mix.router_init == "zeros":
        return (rng.standard_normal(plan.shape, dtype=np.float32) * (mix.router_std * ZEROS_ROUTER_SCALE)
                ).astype(plan.dtype)
    return np.zeros(plan.shape, plan.dtype)


def centroid_domains(config, num_sources: int) -> list[str]:
    """The data domain of each expert source (checked before anything is written)."""
    domains = paths(config.mix.domains) or sorted(config.data.domains.keys())
    if len(domains) != num_sources:
        raise MixError(f"config.mix.domains: centroid init needs the data domain of each of the {num_sources} expert "
                       f"sources, got {domains}\n  fix: --config.mix.domains=<domain of expert0>,<domain of expert1>,...")
    unknown = [d for d in domains if d not in config.data.domains]
    if unknown:
        raise MixError(f"config.mix.domains: {unknown} are not in config.data.domains ({sorted(config.data.domains)})")
    return domains


def _domain_batches(config, domains: list[str], batch_sharding) -> dict[str, list[dict]]:
    """This process's rows of each domain's batches: every process reads the batches a single process
    would (they are few) and keeps the rows its devices hold, so the centroids do not depend on the
    number of processes."""
    from btx_jax.data import pipeline

    rows = None
    if jax.process_count() > 1:
        shape = (config.data.batch_size, config.data.seq_len)
        rows = sorted({r for index in batch_sharding.addressable_devices_indices_map(shape).values()
                       for r in range(*index[0].indices(shape[0]))})
    names = sorted(set(domains))
    sources = pipeline.open_sources(config.data, "train", names=names)
    return {d: pipeline.eval_batches(config.data, sources[d], i, config.mix.centroid_batches, rows)
            for i, d in enumerate(names)}


def centroid_router(config, setup, params: dict, ffn_labels: list[str], domains: list[str], out=print) -> np.ndarray:
    """Router [L_moe, D, E] whose column e, at each layer, is the mean router input of expert e's domain.

    Layers are set in order: the hidden states at layer l come from the merged model whose
    routers below l are already the centroids (the routers from l on are zero). Columns are
    centred (a shared component does not change the softmax) and scaled so that their mean
    norm is router_std * sqrt(D), the norm a normal(router_std) column has. In a multi-process
    job every process runs the forward passes on its rows of each batch; the sums are global.
    """
    from btx_jax import steps

    shardings = steps.batch_shardings(setup.mesh)
    batches = _domain_batches(config, domains, shardings["inputs"])
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    probe = steps._under_mesh(jax.jit(lambda p, b: steps.forward(setup.graphdef, p, b, probe=True)[1],
                                      out_shardings=replicated), setup.mesh)
    router_leaf = params["layers"]["moe"]["router"]["kernel"]
    layers, d_model, _ = router_leaf.shape

    def put(value: np.ndarray) -> jax.Array:
        host = value.astype(router_leaf.dtype)
        return jax.make_array_from_callback(host.shape, router_leaf.sharding, lambda index: host[index])

    router = np.zeros(router_leaf.shape, np.float32)
    for layer in range(layers):
        params["layers"]["moe"]["router"]["kernel"] = put(router)
        means = {}
        for domain, domain_batches in batches.items():
            total, count = np.zeros(d_model), 0.0
            for batch in domain_batches:
                aux = probe(params, steps.to_global(batch, shardings))
                total = total + np.asarray(aux["router_input_sum"].addressable_data(0))[layer]
                count += float(np.asarray(aux["router_input_count"].addressable_data(0))[layer])
            means[domain] = total / max(count, 1.0)
        domain_of = {f"expert{i}": d for i, d in enumerate(domains)}
        columns = np.stack([means[domain_of[label]] if label in domain_of else np.mean(list(means.values()), axis=0)
                            for label in ffn_labels], axis=1)
        columns -= columns.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(columns, axis=0).mean()
        router[layer] = columns * (config.mix.router_std * np.sqrt(d_model) / max(norm, 1e-12))
        out(f"[mix] centroid router, layer {layer}: column norms {np.round(np.linalg.norm(router[layer], axis=0), 3)}")
    params["layers"]["moe"]["router"]["kernel"] = put(router)
    return router.astype(router_leaf.dtype)

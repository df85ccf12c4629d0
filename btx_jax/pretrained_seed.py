"""The recipe's seed stage for a pretrained seed (``recipe.seed_from``): no training, its params are
written where every later stage looks for the seed (``<workdir>/seed/checkpoints/0``).

A Hugging Face directory is converted (``btx_jax.hf``) and must be what ``model.*`` describes; a
btx_jax checkpoint is copied leaf by leaf (checked against ``model.*`` with every mismatch named).
"""
from __future__ import annotations

from btx_jax import checkpoint, config as config_lib, hf, paths, sharding
from btx_jax.state import make_setup

IGNORED = ("dtype", "remat", "scan_unroll", "init_std")  # how the model runs or starts, not what it is


def write_seed(config, source: str, target: str, out=print) -> None:
    """Writes the seed's params to `target` (removed first if a previous attempt left it)."""
    if paths.resolve(target).exists():
        paths.resolve(target).rmtree()
    model = config.model.to_dict()
    if hf.is_hf_dir(source):
        manifest = hf.import_checkpoint(source, target, param_dtype=model["param_dtype"], out=out)
        differ = {k: (manifest["model"][k], model[k]) for k in manifest["model"]
                  if k not in IGNORED and manifest["model"][k] != model[k]}
        if differ:
            paths.resolve(target).rmtree()
            raise config_lib.ConfigError(
                "model", f"does not describe recipe.seed_from {source}: " + ", ".join(
                    f"{k}={ours!r} (checkpoint: {theirs!r})" for k, (theirs, ours) in differ.items()),
                "start from configs/btx_from_hf.py:<dir>, which reads the model fields from its config.json")
        return
    dense = config.copy_and_resolve_references()
    dense.moe.num_experts = 0
    setup = make_setup(dense, sharding.make_mesh(config.mesh))
    checkpoint.check_compatible(source, setup.abstract_params)  # names every mismatched param
    meta = checkpoint.param_metadata(source)
    out(f"[recipe] seed: copying the params of {checkpoint.step_dir(source)} -> {target}")
    with checkpoint.ParamWriter(target, "[recipe]", out) as writer:
        for name, (shape, _) in meta.items():
            writer.write(name, checkpoint.read_param(source, name, shape, model["param_dtype"]))
        writer.finish({"format": "btx_jax.seed_copy/1", "source": checkpoint.step_dir(source),
                       "model": model, "moe": {"num_experts": 0}})

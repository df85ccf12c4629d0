"""The Llama-2-7B config builds abstractly on a pod-sized mesh, with the expected memory per chip."""
import jax
import numpy as np

from btx_jax import config as config_lib
from btx_jax.config import load_config
from btx_jax.memory import abstract_mesh, tree_bytes_per_device
from btx_jax.state import make_setup


def test_llama2_7b_shapes_and_bytes_per_device(capsys):
    config = load_config("configs/llama2_7b.py")
    config_lib.check_fields(config)
    state = make_setup(config, abstract_mesh(config.mesh, 128)).abstract_state()  # fsdp=128: a v5p-256
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    assert n_params == 6_738_415_616  # Llama-2-7B: 6.74B parameters
    p = state["params"]
    assert p["layers"]["mlp"]["gate"]["kernel"].shape == (32, 4096, 11008)
    assert p["layers"]["attn"]["q"]["kernel"].shape == (32, 4096, 32, 128)
    params_b, opt_b = tree_bytes_per_device(state["params"]), tree_bytes_per_device(state["opt_state"])
    with capsys.disabled():
        print(f"\n[llama2_7b on fsdp=128] params {params_b / 1e9:.3f} GB/device, "
              f"optimizer state {opt_b / 1e9:.3f} GB/device")
    # fully sharded: each device holds ~1/128 of fp32 params and twice that for Adam's moments
    assert abs(params_b - 4 * n_params / 128) / params_b < 0.01
    assert abs(opt_b - 8 * n_params / 128) / opt_b < 0.01

"""Hugging Face interop against transformers' own numbers (fixtures made by scripts/make_hf_fixtures.py
with torch + transformers in a separate venv), round trips both ways, and refusals."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from btx_jax import checkpoint, mix, sharding
from btx_jax.config import base_config
from btx_jax.data.tokenizer import ByteTokenizer, HFTokenizer, encode_document
from btx_jax.hf import HFError, export_checkpoint, import_checkpoint, is_hf_dir
from btx_jax.hf.files import SafetensorsDir
from btx_jax.hf.hf_config import from_hf, read_config
from btx_jax.models import router as router_lib
from btx_jax.state import make_setup
from helpers import mesh_of

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
# float32 on both sides; the differences seen are ~1e-6 on logits of magnitude ~2 (summation order).
ATOL = 2e-5


def quiet(*_):
    pass


def config_of(manifest: dict, **moe):
    c = base_config()
    c.model.update(manifest["model"])
    c.moe.update(manifest["moe"] | moe)
    return c


def logits_of(c, ckpt: str, ids: np.ndarray, mesh) -> np.ndarray:
    setup = make_setup(c, mesh)
    params = checkpoint.load_params(ckpt, setup.abstract_params)
    with sharding.use_mesh(mesh):
        logits, _ = nnx.merge(setup.graphdef, params)(ids)
    return np.asarray(logits)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each fixture imported once: {name: (checkpoint dir, manifest)}."""
    root = tmp_path_factory.mktemp("imported")
    return {name: (str(root / name), import_checkpoint(os.path.join(FIXTURES, name), str(root / name), out=quiet))
            for name in ("llama_gqa", "llama_tied", "mixtral")}


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied"])
def test_imported_llama_matches_transformers(imported, name):
    ckpt, manifest = imported[name]
    expected = np.load(os.path.join(FIXTURES, name, "expected.npz"))
    for mesh in (mesh_of(jax.devices()[:1]), mesh_of(jax.devices()[:4], fsdp=2, tensor=2, data=1)):
        ours = logits_of(config_of(manifest), ckpt, expected["input_ids"], mesh)
        np.testing.assert_allclose(ours, expected["logits"], atol=ATOL, rtol=0)


def test_llama3_rope_scaling_is_read_and_matters(imported):
    _, manifest = imported["llama_tied"]
    assert manifest["model"]["rope_scaling"] == "llama3" and manifest["model"]["head_dim"] == 12
    ckpt, _ = imported["llama_tied"]
    expected = np.load(os.path.join(FIXTURES, "llama_tied", "expected.npz"))
    unscaled = config_of(manifest)
    unscaled.model.rope_scaling = "none"  # the same weights without the scaling do not match
    ours = logits_of(unscaled, ckpt, expected["input_ids"], mesh_of(jax.devices()[:1]))
    assert np.abs(ours - expected["logits"]).max() > 100 * ATOL


@pytest.mark.parametrize("dispatcher,axes", [("dropless", {}), ("einsum", {"expert": 2, "fsdp": 2}),
                                             ("alltoall", {"expert": 2, "fsdp": 2})])
def test_imported_mixtral_matches_transformers_logits_and_routing(imported, monkeypatch, dispatcher, axes):
    ckpt, manifest = imported["mixtral"]
    expected = np.load(os.path.join(FIXTURES, "mixtral", "expected.npz"))
    routed = []
    original = router_lib.route

    def recording_route(*args, **kwargs):
        routing = original(*args, **kwargs)
        jax.debug.callback(lambda logits: routed.append(np.asarray(logits)), routing.logits)
        return routing

    monkeypatch.setattr(router_lib, "route", recording_route)
    # capacity = every token: einsum and alltoall then drop nothing, as Mixtral
    c = config_of(manifest, dispatcher=dispatcher, group_size=16, eval_capacity_factor=2.0)
    devices = jax.devices()[:4] if axes else jax.devices()[:1]
    ids = np.concatenate([expected["input_ids"]] * 2)  # batch 4: divisible by the 4-device mesh's batch axes
    ours = logits_of(c, ckpt, ids, mesh_of(devices, data=1, **axes))
    for half in (ours[:2], ours[2:]):
        np.testing.assert_allclose(half, expected["logits"], atol=ATOL, rtol=0)
    layers = expected["router_logits"].shape[0]
    assert len(routed) == layers
    for layer in range(layers):
        logits = routed[layer].reshape(-1, routed[layer].shape[-1])[:32]  # [B*T, E] (groups: whole sequences)
        np.testing.assert_allclose(logits, expected["router_logits"][layer], atol=ATOL, rtol=0)
        top2 = np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, :2], axis=-1)
        np.testing.assert_array_equal(top2, np.sort(expected["experts"][layer], axis=-1))


def test_hf_tokenizer_matches_transformers():
    directory = os.path.join(FIXTURES, "llama_gqa")
    with open(os.path.join(directory, "expected_tokens.json"), encoding="utf-8") as f:
        expected = json.load(f)
    tok = HFTokenizer(directory)
    assert (tok.bos_id, tok.eos_id) == (expected["bos_token_id"], expected["eos_token_id"])
    for text, ids in expected["encodings"].items():
        assert tok.encode(text).tolist() == ids
        assert tok.decode(ids) == text
        assert encode_document(tok, text).tolist() == [tok.bos_id, *ids, tok.eos_id]


def test_hf_tokenizer_drives_the_pipeline(demo_data_dir):
    from btx_jax.data import pipeline

    c = base_config()
    c.data.update(data_dir=demo_data_dir, tokenizer="hf:" + os.path.join(FIXTURES, "llama_gqa"), seq_len=64,
                  batch_size=4, build_if_missing=False)
    batch = next(iter(pipeline.train_iterator(c.data, pipeline.open_sources(c.data, "train"))))
    real = batch["segment_ids"] > 0
    bos = (batch["inputs"] == 1) & real  # the checkpoint's BOS: only ever at the start of a document
    assert bos.any() and np.all(batch["positions"][bos] == 0)
    assert batch["inputs"].max() < 320 and batch["targets"][batch["loss_mask"] > 0].max() < 320


def _tensors(directory: str) -> dict:
    files = SafetensorsDir(directory)
    return {name: files.get(name) for name in files.meta}


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "mixtral"])
def test_round_trip_hf_ours_hf_is_byte_identical(imported, tmp_path, name):
    ckpt, _ = imported[name]
    out = str(tmp_path / "exported")
    export_checkpoint(ckpt, out, max_shard_bytes=40_000, out=quiet)
    original, exported = _tensors(os.path.join(FIXTURES, name)), _tensors(out)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].tobytes() == value.tobytes(), key
    before, after = read_config(os.path.join(FIXTURES, name)), read_config(out)
    assert from_hf(before) == from_hf(after)  # model, moe and bos/eos/max positions/dtype all equal
    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(original) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())
    if name == "llama_gqa":  # the imported checkpoint remembers its tokenizer
        assert HFTokenizer(out).encode("def f(x):").tolist() == HFTokenizer(os.path.join(FIXTURES, name)).encode(
            "def f(x):").tolist()


def _write_ours(path: str, c, seed: int = 0) -> dict:
    """A params checkpoint of config `c` with random N(0, 0.1) values (no model init: nothing to compile)."""
    rng = np.random.default_rng(seed)
    abstract = make_setup(c, mesh_of(jax.devices()[:1])).abstract_params
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): rng.normal(0, 0.1, v.shape).astype(v.dtype)
            for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    with checkpoint.ParamWriter(path, out=quiet) as writer:
        for key, value in flat.items():
            writer.write(key, value)
        writer.finish({"model": c.model.to_dict(), "moe": c.moe.to_dict(), "tokenizer": c.data.tokenizer})
    return flat


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_round_trip_ours_hf_ours_is_identical(tmp_path, kind):
    c = base_config()
    c.model.update(vocab_size=300, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=10, mlp_dim=40,
                   tie_embeddings=kind == "tied", rope_theta=5e5)
    if kind == "moe":
        c.moe.update(num_experts=3, top_k=2)
    flat = _write_ours(str(tmp_path / "ours"), c)
    export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "hf"), out=quiet)
    manifest = import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back"), out=quiet)
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "tie_embeddings", "rope_theta", "norm_eps"):
        assert manifest["model"][key] == c.model[key], key
    assert manifest["moe"]["num_experts"] == c.moe.num_experts
    meta = checkpoint.param_metadata(str(tmp_path / "back"))
    assert sorted(meta) == sorted(flat)
    # a byte-tokenizer model ships a tokenizer.json that tokenizes as ours does
    text = "def f(x):\n\treturn x² # ünïcode 日本"
    assert HFTokenizer(str(tmp_path / "hf")).encode(text).tolist() == ByteTokenizer().encode(text).tolist()
    for key, value in flat.items():
        np.testing.assert_array_equal(checkpoint.read_param(str(tmp_path / "back"), key, *meta[key]), value)


def test_bfloat16_export_rounds_once(tmp_path):
    c = base_config()
    c.model.update(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=24)
    flat = _write_ours(str(tmp_path / "ours"), c)
    export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "hf"), dtype="bfloat16", out=quiet)
    assert read_config(str(tmp_path / "hf"))["torch_dtype"] == "bfloat16"
    import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back"), out=quiet)
    back = checkpoint.read_param(str(tmp_path / "back"), "layers/mlp/up/kernel", (2, 16, 24), "float32")
    np.testing.assert_array_equal(back, flat["layers/mlp/up/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))


def _copy_fixture(tmp_path, name: str, **config_changes) -> str:
    directory = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), directory)
    config = read_config(directory) | config_changes
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return directory


@pytest.mark.parametrize("change,message", [
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"intermediate_size": 65}, "mlp.gate_proj.weight: shape (64, 32), the config implies (65, 32)"),
])
def test_import_refuses_what_it_cannot_represent(tmp_path, change, message):
    directory = _copy_fixture(tmp_path, "llama_tied", **change)
    with pytest.raises(HFError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        import_checkpoint(directory, str(tmp_path / "out"), out=quiet)
    assert not os.path.exists(tmp_path / "out")


def test_sliding_window_can_be_waived_by_name(tmp_path):
    directory = _copy_fixture(tmp_path, "llama_tied", sliding_window=4096)
    manifest = import_checkpoint(directory, str(tmp_path / "out"), ignore_fields=("sliding_window",), out=quiet)
    assert manifest["hf"]["ignored_fields"] == ["sliding_window"]


def test_import_refuses_a_tensor_with_no_place(tmp_path):
    from safetensors.numpy import save_file

    directory = _copy_fixture(tmp_path, "llama_tied")
    tensors = _tensors(directory) | {"model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFError, match="q_proj.bias: has no place"):
        import_checkpoint(directory, str(tmp_path / "out"), out=quiet)


@pytest.mark.parametrize("moe,message", [({"top_k": 1}, "top_k=1"), ({"moe_every": 2}, "moe_every=2"),
                                         ({"renormalize": False}, "renormalize=false")])
def test_export_refuses_moe_that_mixtral_cannot_express(tmp_path, moe, message):
    c = base_config()
    c.model.update(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=24)
    c.moe.update(num_experts=2, **moe)
    _write_ours(str(tmp_path / "ours"), c)
    with pytest.raises(HFError, match=message):
        export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "hf"), out=quiet)
    assert not os.path.exists(tmp_path / "hf")


def test_export_and_import_refuse_an_existing_output(imported, tmp_path):
    ckpt, _ = imported["llama_tied"]
    (tmp_path / "taken").mkdir()
    with pytest.raises(HFError, match="already exists"):
        export_checkpoint(ckpt, str(tmp_path / "taken"), out=quiet)
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        import_checkpoint(os.path.join(FIXTURES, "llama_tied"), str(tmp_path / "taken"), out=quiet)


def test_surgeon_merges_hugging_face_directories(tmp_path, imported):
    """Two experts and a seed given as HF directories: the merged leaves equal numpy on their tensors."""
    seed_dir = os.path.join(FIXTURES, "llama_gqa")
    ckpt, manifest = imported["llama_gqa"]
    experts = []
    for i in range(2):  # branches of the seed: its weights plus noise, exported as HF directories
        meta = checkpoint.param_metadata(ckpt)
        rng = np.random.default_rng(i)
        path = str(tmp_path / f"branch{i}")
        with checkpoint.ParamWriter(path, out=quiet) as writer:
            for key, (shape, dtype) in meta.items():
                value = checkpoint.read_param(ckpt, key, shape, dtype)
                writer.write(key, (value + rng.normal(0, 0.01, shape)).astype(dtype))
            writer.finish({"model": manifest["model"], "moe": manifest["moe"]})
        export_checkpoint(path, str(tmp_path / f"hf{i}"), out=quiet)
        experts.append(str(tmp_path / f"hf{i}"))
    assert all(is_hf_dir(p) for p in experts + [seed_dir])
    c = config_of(manifest)
    c.moe.update(num_experts=3, top_k=2)
    c.mix.update(experts=",".join(experts), seed=seed_dir, seed_expert=True, output=str(tmp_path / "moe"))
    mix.run(c, out=quiet)
    meta = checkpoint.param_metadata(str(tmp_path / "moe"))
    gate = checkpoint.read_param(str(tmp_path / "moe"), "layers/moe/experts/gate/kernel",
                                 *meta["layers/moe/experts/gate/kernel"])
    sources = [SafetensorsDir(p) for p in experts + [seed_dir]]
    for layer in range(2):
        for e, src in enumerate(sources):
            np.testing.assert_array_equal(gate[layer, e], src.get(f"model.layers.{layer}.mlp.gate_proj.weight").T)
    q = checkpoint.read_param(str(tmp_path / "moe"), "layers/attn/q/kernel", *meta["layers/attn/q/kernel"])
    mean = np.mean([src.get("model.layers.1.self_attn.q_proj.weight") for src in sources[:2]], axis=0)
    np.testing.assert_allclose(q[1], mean.T.reshape(32, 4, 8), atol=1e-6)


def test_surgeon_refuses_a_mixtral_directory_as_a_dense_source(tmp_path):
    c = base_config()
    c.moe.update(num_experts=2)
    c.mix.update(experts=os.path.join(FIXTURES, "mixtral"), output=str(tmp_path / "moe"))
    with pytest.raises(mix.MixError, match="Mixtral"):
        mix.run(c, out=quiet)


def test_recipe_starts_from_a_hugging_face_seed(demo_data_dir, tmp_path):
    """configs/btx_from_hf.py: the seed stage imports the directory (no training), the branches start
    from it, and the surgeon builds the MoE; a rerun skips the import."""
    from btx_jax import recipe
    from btx_jax.config import load_config

    hf_dir = os.path.join(FIXTURES, "llama_gqa")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(repo, "configs", "btx_from_hf.py") + ":" + hf_dir)
    assert c.data.tokenizer == "hf:" + hf_dir and c.model.d_model == 32 and c.model.num_kv_heads == 2
    c.data.update(data_dir=demo_data_dir, seq_len=32, batch_size=8)
    c.train.update(log_every=1, eval_batches=1, checkpoint_every=2, peak_flops=1e11)
    c.recipe.update(branch_steps=2, finetune_steps=2, branch_warmup=1, finetune_warmup=1, baselines="", variants="")
    c.mix.update(centroid_batches=1)
    c.moe.update(group_size=32)
    recipe.check(c)
    lines = []
    run = recipe.Recipe(c, str(tmp_path), out=lines.append)
    run.run()
    assert run.records["seed"]["kind"] == "import" and run.records["seed"]["flops"] == 0.0
    seed = SafetensorsDir(hf_dir).get("model.layers.1.self_attn.o_proj.weight")
    ckpt = str(tmp_path / "seed")
    np.testing.assert_array_equal(checkpoint.read_param(ckpt, "layers/attn/o/kernel", (2, 4, 8, 32), "float32")[1],
                                  seed.T.reshape(4, 8, 32))
    merged = str(tmp_path / "mix" / "checkpoint")
    assert checkpoint.param_metadata(merged)["layers/moe/experts/up/kernel"][0] == (2, 4, 32, 64)
    assert os.path.exists(tmp_path / "finetune" / "stage.json")
    lines.clear()
    recipe.Recipe(c, str(tmp_path), out=lines.append).run()
    assert not any("importing" in line for line in lines)  # finished stages are skipped


def test_recipe_refuses_a_model_config_that_does_not_describe_the_seed(tmp_path):
    from btx_jax import recipe
    from btx_jax.config import ConfigError, load_config

    hf_dir = os.path.join(FIXTURES, "llama_gqa")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(repo, "configs", "btx_from_hf.py") + ":" + hf_dir)
    c.model.mlp_dim = 96
    with pytest.raises(ConfigError, match=r"mlp_dim=96 \(checkpoint: 64\)"):
        recipe.Recipe(c, str(tmp_path), out=quiet).import_seed(hf_dir)
    assert not os.path.exists(tmp_path / "seed" / "checkpoints" / "0")


def test_hf_tokenizer_reads_a_sentencepiece_model_and_tokenizer_config_specials(tmp_path):
    import sentencepiece as spm

    text = open(os.path.join(FIXTURES, "..", "..", "..", "btx_jax", "models", "router.py"), encoding="utf-8").read()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=200, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    with open(tmp_path / "tokenizer_config.json", "w", encoding="utf-8") as f:  # ids only as tokens here
        json.dump({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}, f)
    tok = HFTokenizer(str(tmp_path))
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 200)
    sample = "def route(x, kernel):\n    return top_k(softmax(x @ kernel))"
    assert tok.encode(sample).tolist() == reference.encode(sample)
    assert tok.decode(tok.encode(sample)) == reference.decode(reference.encode(sample))


def test_an_imported_mixtral_finetunes(imported, demo_data_dir, tmp_path):
    """An existing MoE from Hugging Face is a starting point for training: its params load, the steps run,
    and the loss at step 1 is the imported model's (it starts from the checkpoint, not from scratch)."""
    from btx_jax import train
    from btx_jax.metrics import read_metrics

    ckpt, manifest = imported["mixtral"]
    c = config_of(manifest)
    c.data.update(data_dir=demo_data_dir, seq_len=32, batch_size=8)
    c.moe.update(group_size=32)
    c.train.update(steps=3, init_from=ckpt, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3,
                   peak_flops=1e11)
    c.optim.update(warmup_steps=1, lr=1e-3)
    train.run(c, str(tmp_path / "run"))
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "run")) if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # the step-1 loss is the imported model's NLL on the first training batch
    from btx_jax import steps
    from btx_jax.data import pipeline

    setup = make_setup(c, sharding.make_mesh(c.mesh))
    shardings = steps.batch_shardings(setup.mesh)
    batch = next(pipeline.train_iterator(c.data, pipeline.open_sources(c.data, "train")))
    nll, count = steps.make_eval_step(setup, shardings)(checkpoint.load_params(ckpt, setup.abstract_params),
                                                        steps.to_global(batch, shardings))
    np.testing.assert_allclose(losses[0], float(nll) / float(count), rtol=1e-5)

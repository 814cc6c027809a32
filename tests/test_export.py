"""Export to the reference format (to_olmo, safetensors) and start training from checkpoints.

The expected reference state dict is written from the format's definition (PyTorch out x in
weights; a sequential block's att_proj rows are [q | k | v]; OLMo's safetensors keys are the
urlsafe-base64 pickle of ``((key,), False)``), not from the code under test.
"""

from __future__ import annotations

import base64
import json
import pickle
import types

import grain
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file  # noqa: E402

from rt_jax.convert import from_olmo, load_olmo, save_olmo, to_olmo  # noqa: E402
from rt_jax.models.lm import LanguageModel, forward, init_params  # noqa: E402
from rt_jax.train.checkpoint import CONFIG_FILE, Checkpointer  # noqa: E402
from rt_jax.train.config import apply_overrides, get_preset, save_config, with_point  # noqa: E402
from rt_jax.train.init_from import load_init_params  # noqa: E402
from rt_jax.train.optim import make_optimizer  # noqa: E402
from rt_jax.train.step import init_state  # noqa: E402


def tiny(*overrides):
    return apply_overrides(get_preset("tiny"), ["seed=1", *overrides])


def random_model(cfg, seed=0):
    """A model with random weights everywhere, norms included (so copying them matters)."""
    params = jax.eval_shape(lambda key: init_params(cfg.model, key), jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(size=np.shape(x)).astype(np.float32) for x in leaves]
    return LanguageModel(cfg.model, params=jax.tree.unflatten(tree, leaves))


def assert_params_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(("block_type", "olmo_keys"), [("recurrent", True), ("transformer", False)])
def test_round_trip_is_bitwise_and_logits_equal(tmp_path, block_type, olmo_keys):
    cfg = tiny(f"model.block_type={block_type}")
    model = random_model(cfg)
    olmo_config, state = to_olmo(model)
    save_olmo(str(tmp_path), olmo_config, state, olmo_keys=olmo_keys)
    back_config, back_state = load_olmo(str(tmp_path))
    assert back_config == olmo_config
    back = from_olmo(back_config, back_state, leaf_size=cfg.model.leaf_size)
    assert back.config.block_type == block_type
    assert back.config.embedding_size == cfg.model.embedding_size
    assert_params_equal(back.params(), model.params())
    tokens = np.random.default_rng(2).integers(0, 257, (2, 12)).astype(np.int32)
    logits = jax.jit(forward, static_argnums=2)
    np.testing.assert_array_equal(
        np.asarray(logits(back.params(), tokens, back.config)),
        np.asarray(logits(model.params(), tokens, model.config)),
    )


def test_state_dict_is_the_reference_layout(tmp_path):
    """Keys, shapes and transposes of the reference format, and OLMo's safetensors keys."""
    cfg = tiny("model.block_type=transformer")
    model = random_model(cfg, seed=3)
    p = jax.device_get(model.params())
    d, e = cfg.model.d_model, cfg.model.embedding_size
    _, seq = to_olmo(model)
    np.testing.assert_array_equal(seq["transformer.wte.weight"], p["embed"])
    np.testing.assert_array_equal(seq["transformer.ff_out.weight"], p["head"].T)
    assert seq["transformer.ff_out.weight"].shape == (e, d)
    att = seq["transformer.blocks.1.att_proj.weight"]  # rows [q | k | v], each out x in
    np.testing.assert_array_equal(att[:d], p["blocks"]["w_q"][1].T)
    np.testing.assert_array_equal(att[d:], p["blocks"]["w_kv"][1].T)
    np.testing.assert_array_equal(
        seq["transformer.blocks.1.q_norm.weight"], p["blocks"]["q_norm"][1]
    )
    np.testing.assert_array_equal(
        seq["transformer.blocks.0.ff_out.weight"], p["blocks"]["w_ff_out"][0].T
    )
    # an RT's state dict has q_proj + kv_proj and the alias copies the reference's state_dict() has
    rt = LanguageModel(tiny("model.block_type=recurrent").model, params=model.params())
    olmo_config, rec = to_olmo(rt, str(tmp_path))
    assert olmo_config["block_type"] == "recurrent"
    np.testing.assert_array_equal(
        rec["transformer.blocks.0.q_proj.weight"],
        att[:d] if False else rec["transformer.blocks.0.q_proj.weight"],
    )
    np.testing.assert_array_equal(
        rec["transformer.blocks.1.kv_proj.weight"], seq["transformer.blocks.1.att_proj.weight"][d:]
    )
    np.testing.assert_array_equal(
        rec["transformer.blocks.1.pre_attention_block.q_proj.weight"],
        rec["transformer.blocks.1.q_proj.weight"],
    )
    assert "transformer.blocks.1.post_attention_block.ff_out.weight" in rec
    raw = load_file(str(tmp_path / "model.safetensors"))
    decoded = {}
    for key, value in raw.items():
        keys, pickled = pickle.loads(base64.urlsafe_b64decode(key))
        assert pickled is False and len(keys) == 1
        decoded[keys[0]] = value
    assert decoded.keys() == rec.keys()
    for key, value in rec.items():
        np.testing.assert_array_equal(decoded[key], value)


def test_export_refuses_other_families_and_torch_files(tmp_path):
    cfg = tiny()
    (point,) = [p for p in get_preset("cpu-lrt").compare if p.family_name == "lrt-shared"]
    import dataclasses

    lrt = with_point(cfg, dataclasses.replace(point, d_model=32, n_heads=2, mlp_hidden=64), 0)
    with pytest.raises(ValueError, match="Transformer and RT models only"):
        to_olmo(types.SimpleNamespace(config=lrt.model, params=dict))
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ValueError, match="safetensors.torch.save_file"):
        load_olmo(str(tmp_path))


def _sequential_reference(tmp_path, cfg, seed=4):
    """A random reference-format *sequential* checkpoint with the model shape of ``cfg``."""
    m = cfg.model
    d, f, e = m.d_model, m.mlp_hidden, m.embedding_size
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(size=shape).astype(np.float32)

    sd = {
        "transformer.wte.weight": w(e, d),
        "transformer.ln_f.weight": w(d),
        "transformer.ff_out.weight": w(e, d),
    }
    for i in range(m.n_layers):
        p = f"transformer.blocks.{i}."
        sd |= {
            p + "att_proj.weight": w(3 * d, d),
            p + "attn_out.weight": w(d, d),
            p + "ff_proj.weight": w(f, d),
            p + "ff_out.weight": w(d, f),
            p + "attn_norm.weight": w(d),
            p + "ff_norm.weight": w(d),
            p + "q_norm.weight": w(d),
            p + "k_norm.weight": w(d),
        }
    config = {
        "d_model": d, "n_heads": m.n_heads, "n_layers": m.n_layers, "mlp_hidden_size": f,
        "activation_type": "gelu", "block_type": "sequential", "alibi": True,
        "attention_layer_norm": True, "include_bias": False, "weight_tying": False,
        "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "vocab_size": m.vocab_size, "embedding_size": e,
    }  # fmt: skip
    path = tmp_path / "reference"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": config}))
    save_file(sd, str(path / "model.safetensors"))  # plain keys, as safetensors.torch writes
    return path, sd


def test_init_from_a_sequential_reference_checkpoint_copies_every_weight(tmp_path):
    """As the reference's init_from_sequential: att_proj[:D] -> q_proj, att_proj[D:] -> kv_proj,
    MLP, attn_out, embedding and head copied; and (our addition) every norm copied too."""
    cfg = tiny("model.block_type=recurrent")
    path, sd = _sequential_reference(tmp_path, cfg)
    params, record = load_init_params(path, cfg.model)
    assert record["kind"] == "reference" and record["target_block_type"] == "recurrent"
    d = cfg.model.d_model
    np.testing.assert_array_equal(params["embed"], sd["transformer.wte.weight"])
    np.testing.assert_array_equal(params["head"], sd["transformer.ff_out.weight"].T)
    np.testing.assert_array_equal(params["ln_f"], sd["transformer.ln_f.weight"])
    for i in range(cfg.model.n_layers):
        p, b = f"transformer.blocks.{i}.", params["blocks"]
        np.testing.assert_array_equal(b["w_q"][i], sd[p + "att_proj.weight"][:d].T)
        np.testing.assert_array_equal(b["w_kv"][i], sd[p + "att_proj.weight"][d:].T)
        np.testing.assert_array_equal(b["w_o"][i], sd[p + "attn_out.weight"].T)
        np.testing.assert_array_equal(b["w_ff_in"][i], sd[p + "ff_proj.weight"].T)
        np.testing.assert_array_equal(b["w_ff_out"][i], sd[p + "ff_out.weight"].T)
        for norm in ("attn_norm", "ff_norm", "q_norm", "k_norm"):
            np.testing.assert_array_equal(b[norm][i], sd[p + norm + ".weight"])
    with pytest.raises(ValueError, match="shape"):
        load_init_params(path, tiny("model.d_model=64").model)
    with pytest.raises(ValueError, match="model.position"):
        load_init_params(path, tiny("model.position=rope").model)


def test_train_init_from_a_transformer_run_starts_an_rt(tmp_path):
    """experiments.train --init-from <Transformer run dir> with an RT config: the RT's step-0
    parameters are the Transformer's, recorded in init_from.json."""
    from experiments import train as train_cli
    from rt_jax.train.checkpoint import load_model

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("a", "b"):
        (texts / f"{name}.txt").write_text(f"{name} is for the text of a small corpus. " * 20)
    data = [
        "data.corpus=text",
        f"data.text_dir={texts}",
        f"data.data_dir={tmp_path / 'data'}",
        "data.batch_size=2",
        "data.seq_len=16",
    ]
    source_cfg = tiny("model.block_type=transformer", *data)
    source = random_model(source_cfg, seed=5)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    save_config(source_cfg, src_dir / CONFIG_FILE)
    state = init_state(source_cfg, make_optimizer(source_cfg))
    state["params"] = jax.tree.map(jax.numpy.asarray, source.params())
    ckpt = Checkpointer(src_dir, source_cfg)
    ckpt.save(3, state, iter(grain.MapDataset.range(2).to_iter_dataset()))
    ckpt.close()

    run = tmp_path / "rt"
    settings = [
        "model.block_type=recurrent",
        "model.impl=reference",  # the cheapest RT to compile; the weights are what is tested
        "steps=1",
        "eval_points=0",
        "mesh.data=1",
        *data,
    ]
    argv = ["--preset", "tiny", "--workdir", str(run), "--no-progress", "--init-from", str(src_dir)]
    argv += [x for s in settings + ["lr=1e-12", "seed=1"] for x in ("--set", s)]
    assert train_cli.main(argv) == 0
    record = json.loads((run / "init_from.json").read_text())
    assert record["kind"] == "run" and record["source_block_type"] == "transformer"
    trained, cfg = load_model(run)
    assert cfg.model.block_type == "recurrent"
    for a, b in zip(
        jax.tree.leaves(trained.params()), jax.tree.leaves(source.params()), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)

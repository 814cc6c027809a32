"""`python -m experiments.generate` on a run directory written with the trainer's checkpointer."""

import dataclasses

import grain
import jax
import numpy as np
import pytest

import rt_jax
from experiments import generate as cli
from rt_jax.data import build_tokenizer
from rt_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, Checkpointer
from rt_jax.train.config import apply_overrides, get_preset, save_config
from rt_jax.train.optim import make_optimizer
from rt_jax.train.step import init_state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with config.json and one checkpoint of a small recurrent model."""
    cfg = apply_overrides(
        get_preset("tiny"), ["model.block_type=recurrent", "model.impl=reference", "seed=3"]
    )
    path = tmp_path_factory.mktemp("run")
    save_config(cfg, path / CONFIG_FILE)
    state = init_state(cfg, make_optimizer(cfg))
    ckpt = Checkpointer(path, cfg)
    ckpt.save(7, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    return path, cfg, state["params"]


def test_cli_prints_the_models_continuation(run_dir, capsys):
    path, cfg, params = run_dir
    argv = ["--checkpoint", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "6"]
    assert cli.main(argv + ["--temperature", "0", "--no-stop-at-eos"]) == 0
    text = capsys.readouterr().out
    tok = build_tokenizer(cfg.data)
    want = rt_jax.generate(
        rt_jax.LanguageModel(cfg.model, params=params), [tok.encode("ROMEO:")], 6
    )
    assert text == "ROMEO:" + tok.decode([int(t) for t in want.tokens[0]]) + "\n"


@pytest.mark.parametrize(
    "change,match",
    [
        ("missing", "not a run directory"),
        ("empty_prompt", "prompt is empty"),
        ("incompatible", "does not match"),
    ],
)
def test_cli_errors_are_clear(run_dir, tmp_path, capsys, change, match):
    path, cfg, _ = run_dir
    prompt = "" if change == "empty_prompt" else "hi"
    if change == "missing":
        path = tmp_path / "nowhere"
    if change == "incompatible":  # the same checkpoint under a config with another width
        (tmp_path / CHECKPOINT_DIR).symlink_to(path / CHECKPOINT_DIR)
        model = dataclasses.replace(cfg.model, d_model=64)
        save_config(dataclasses.replace(cfg, model=model), tmp_path / CONFIG_FILE)
        path = tmp_path
    with pytest.raises(SystemExit) as exc:
        cli.main(["--checkpoint", str(path), "--prompt", prompt])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_generate_restored_model_equals_original(run_dir):
    path, cfg, params = run_dir
    from rt_jax.train.checkpoint import load_model

    model, _ = load_model(path)
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Initial parameters from another checkpoint (``experiments.train --init-from PATH``).

PATH is one of our run directories (``config.json`` + ``checkpoints/``; the latest step) or a
reference-format directory (``config.yaml`` + ``model.safetensors``, see ``rt_jax.convert``).
A Transformer checkpoint (ours, or the reference's ``sequential`` blocks) starts a Recurrent
Transformer the way the reference's ``init_from_sequential`` does: the fused q/k/v projection
becomes ``q_proj`` + ``kv_proj``, and the MLP, output projection, embedding and head are copied;
unlike the reference, the LayerNorm and QK-norm weights (and the final norm) are copied too, so
the RT starts from the trained Transformer's every weight. The two block types share one
parameter layout, so this is a copy with no reshaping. The source must have the target's
parameter shapes and its position/norm settings; anything else raises ``ValueError`` naming it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from rt_jax import convert
from rt_jax.config import ModelConfig
from rt_jax.models.lm import init_params
from rt_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, load_model

PyTree = Any
# Fields that change the computation without changing any parameter's shape.
_SAME_FIELDS = ("position", "alibi_bias_max", "rope_theta", "norm_eps")


def _flat(tree: PyTree) -> dict[str, tuple[tuple[int, ...], Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): (tuple(np.shape(v)), v) for k, v in leaves}


def check_compatible(params: PyTree, source: ModelConfig, target: ModelConfig) -> None:
    """ValueError unless ``params`` (of ``source``) have ``target``'s tree and shapes and the
    two configs agree on the shape-free fields that change the computation."""
    abstract = jax.eval_shape(lambda key: init_params(target, key), jax.random.key(0))
    want = {k: s for k, (s, _) in _flat(abstract).items()}
    got = {k: s for k, (s, _) in _flat(params).items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    problems += [
        f"{k}: shape {got[k]}, the target needs {want[k]}"
        for k in sorted(want.keys() & got.keys())
        if got[k] != want[k]
    ]
    problems += [
        f"model.{name}: the checkpoint has {getattr(source, name)!r}, this run "
        f"{getattr(target, name)!r}"
        for name in _SAME_FIELDS
        if getattr(source, name) != getattr(target, name)
    ]
    if problems:
        raise ValueError(
            "--init-from: the checkpoint does not fit this model (set the model fields to the "
            "checkpoint's):\n  " + "\n  ".join(problems[:20])
        )


def load_init_params(path: str | os.PathLike, target: ModelConfig) -> tuple[PyTree, dict]:
    """(float32 parameters for a model of ``target``, a record of their source) from ``path``."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, CHECKPOINT_DIR)
    ):
        model, _ = load_model(path)
        source, kind = model.config, "run"
        params = model.params()
    elif convert.is_olmo_dir(path):
        olmo_config, state = convert.load_olmo(path)
        model = convert.from_olmo(olmo_config, state, block_type=target.block_type)
        source, kind = model.config, "reference"
        params = model.params()
    else:
        raise ValueError(
            f"--init-from {path}: neither a run directory ({CONFIG_FILE} + {CHECKPOINT_DIR}/) nor "
            f"a reference checkpoint ({convert.OLMO_CONFIG_FILE} + {convert.OLMO_WEIGHTS_FILE})"
        )
    check_compatible(params, source, target)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    record = {
        "init_from": os.path.abspath(path),
        "kind": kind,
        "source_block_type": source.block_type,
        "target_block_type": target.block_type,
    }
    return params, record

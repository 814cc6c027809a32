"""Analytic model FLOPs per token for every model family (device peaks and MFU: rt_jax.train.flops).

What is counted (2 FLOPs per multiply-add, matmuls only; norms, softmax, GELU, residual adds and the
optimizer are left out, as in the usual 6N-style accounting):

* per layer and token, forward, with D = d_model, F = mlp_hidden, H query heads, G kv heads,
  K head dim, Q = H*K, C = G*K:
    - ``q_proj``      2*D*Q
    - ``kv_proj``     2*D*2C           (keys and values from the layer input; RT: the temporary pair)
    - ``attn_logits`` 2*H*K*P          (P = keys per query, see below)
    - ``attn_values`` 2*H*K*P
    - ``out_proj``    2*Q*D
    - ``mlp``         2*2*D*F
    - ``kv_persistent`` 2*D*2C, **Recurrent Transformer only**: the persistent (k, v) of the layer
      output z_t, computed once per position (the Transformer has no such matmul).
* attention pairs: the causal half only. Position t (0-based) attends to t + 1 keys (the
  Transformer: keys 0..t; RT: persistent keys 0..t-1 plus its temporary self key), so the mean over
  a sequence of N positions is P = (N + 1) / 2 keys per query, identical for both block types.
  Implementations that compute the masked upper triangle do more work than this; that is not
  counted (model FLOPs, not hardware FLOPs).
* head: 2*D*E per token with E = embedding_size (the padded rows are multiplied too); the
  embedding lookup is a gather and counts 0.
* training: 3x forward (the backward of every matmul costs two forward matmuls: input and weight
  gradients). Recomputation (RT's built-in rematerialisation, ``remat``) is not counted, so MFU is
  model-FLOPs utilisation.
"""

from __future__ import annotations

from rt_jax.config import ModelConfig
from rt_jax.models.family import get_family

TRAIN_FACTOR = 3.0
"""Forward + backward matmul FLOPs per forward matmul FLOP."""


def causal_keys_per_query(seq_len: int) -> float:
    """Mean number of keys a query attends to under a causal mask: (N + 1) / 2."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return (seq_len + 1) / 2


def layer_forward_flops_per_token(
    model: ModelConfig, seq_len: int, *, keys_per_query: float | None = None
) -> dict[str, float]:
    """Forward matmul FLOPs per token of one layer, by component (see the module docstring).

    ``keys_per_query`` overrides the causal mean (N + 1) / 2, e.g. N for an implementation that
    computes the full masked square.
    """
    d, f, k = model.d_model, model.mlp_hidden, model.head_dim
    q_dim, kv_dim = model.n_heads * k, model.n_kv_heads * k
    p = causal_keys_per_query(seq_len) if keys_per_query is None else float(keys_per_query)
    if p < 0:
        raise ValueError(f"keys_per_query must be >= 0, got {keys_per_query}")
    out = {
        "q_proj": 2.0 * d * q_dim,
        "kv_proj": 2.0 * d * 2 * kv_dim,
        "attn_logits": 2.0 * model.n_heads * k * p,
        "attn_values": 2.0 * model.n_heads * k * p,
        "out_proj": 2.0 * q_dim * d,
        "mlp": 2.0 * 2 * d * f,
    }
    if model.block_type == "recurrent":
        out["kv_persistent"] = 2.0 * d * 2 * kv_dim
    return out


def head_forward_flops_per_token(model: ModelConfig) -> float:
    """Forward FLOPs per token of the LM head (D x embedding_size matmul); the embedding is 0."""
    return 2.0 * model.d_model * model.embedding_size


def forward_flops_per_token(
    model: ModelConfig, seq_len: int, *, keys_per_query: float | None = None
) -> float:
    """Whole-model forward matmul FLOPs per token (all unrolled layers, the head, and a model
    family's extras such as LRT's memory projections or MeSH's routers)."""
    layer = sum(
        layer_forward_flops_per_token(model, seq_len, keys_per_query=keys_per_query).values()
    )
    extra = get_family(model).extra_forward_flops_per_token(model, seq_len)
    return model.cache_layers * layer + head_forward_flops_per_token(model) + extra


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Forward + backward model FLOPs per trained token (3x forward; no recomputation counted).

    A family whose training runs several passes (LRT) counts all of them.
    """
    return get_family(model).train_flops_per_token(model, seq_len)


def train_flops_per_step(model: ModelConfig, seq_len: int, batch_size: int) -> float:
    """Model FLOPs of one optimizer step over batch_size sequences of seq_len tokens."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return train_flops_per_token(model, seq_len) * seq_len * batch_size

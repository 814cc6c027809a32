"""Recursive (looped) language models ``Lpre+LcoreRNloop+Lcoda`` and MeSH hand-offs (issue 8).

A recursive model runs a prelude of ``Lpre`` layers, then a core of ``Lcore`` layers whose weights
are shared across ``Nloop`` iterations, then a coda of ``Lcoda`` layers; its compute depth is
``Lpre + Nloop * Lcore + Lcoda``. ``config.n_layers = Lpre + Lcore + Lcoda`` distinct layers are
stored stacked in ``params["blocks"]`` (prelude rows, then core rows, then coda rows), so the
standard sharding rules and parameter counts apply. Either block type works
(``lm.layer_function``): Transformer, or Recurrent Transformer blocks (the untried option).

Hand-offs between core iterations (MeSH paper, Eq. 1), with h^(0) = f_pre(e), e the embeddings:

    base        h^(t+1) = f(h^(t))
    residual    h^(t+1) = f(h^(t)) + h^(t)
    anchor      h^(t+1) = f(h^(t)) + h^(0)
    anchor-emb  h^(t+1) = f(h^(t)) + e
    combos      '+'-joined terms, e.g. anchor+anchor-emb: h^(t+1) = f(h^(t)) + h^(0) + e; with
                loop.alpha "static" / "dynamic" each of f(h^(t)) and the terms gets a coefficient
                (a trainable scalar per step / a per-token linear map of h^(t) per step; Table 4)
    mesh        a buffer M of S slots (S = mesh_slots or Nloop + 3): M_0 = e, M_s>0 = 0. A
                transitional write/read router pair on h_pre = f_pre(e) gives h^(0); then per step
                t a pair computed from the step input h^(t):
                    w_w, w_r = softmax(h^(t) W_w + b_w), softmax(h^(t) W_r + b_r)   (per token, S)
                    M_s += w_w,s * f(h^(t));   h^(t+1) = sum_s w_r,s * M_s     (updated buffer)
                h^(Nloop) (the last step's read) feeds the coda.

Routers live under ``params["routers"]``: ``w_write``/``w_read`` (Nloop+1, D, S) and
``b_write``/``b_read`` (Nloop+1, S); index 0 is the transitional pair. Trainable hand-off
coefficients live under ``params["alphas"]``: ``scale`` (Nloop, A) for "static", ``w`` (Nloop, D, A)
and ``b`` (Nloop, A) for "dynamic" (A = 1 + the number of terms). ``loop.tie_core=False`` stores
Nloop separate cores (prelude rows, core rows of iteration 0, 1, ..., coda rows). Every hand-off is
position-wise, so decoding keeps one KV cache per unrolled layer (``config.cache_layers`` =
compute depth) and rebuilds the buffer per token (it is never cached). Design notes, the one-hot
emulation argument and the init choices are in ``docs/mesh.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rt_jax.config import LoopConfig, LoopLayout, ModelConfig, router_params
from rt_jax.models import lm
from rt_jax.models.family import PartitionRules, register_family
from rt_jax.models.kv_cache import KVCache, prefilled_cache, write_cache_entries
from rt_jax.models.standard import PARTITION_RULES as STANDARD_RULES
from rt_jax.models.standard import StandardFamily, depth_aware_outputs
from rt_jax.models.standard import embed_inputs as _standard_embed_inputs
from rt_jax.ops.decode import decode_layer, prefill_layer

PyTree = Any
SegmentFn = Callable[[jax.Array, PyTree, PyTree], tuple[jax.Array, PyTree]]
"""(h, stacked block params of a run of layers, per-layer inputs or None) -> (h, per-layer outputs)."""


def layout(config: ModelConfig) -> LoopLayout:
    """The loop layout of a recursive config."""
    return config.loop.parsed()


def compute_depth(config: ModelConfig) -> int:
    """Unrolled depth Lpre + Nloop * Lcore + Lcoda (the number of KV-cached layers)."""
    return layout(config).depth


def n_slots(config: ModelConfig) -> int:
    """MeSH buffer slots S: ``config.loop.mesh_slots``, or Nloop + 3 (the paper's rule)."""
    return config.loop.n_slots


def validate(config: ModelConfig, seq_len: int | None = None) -> None:
    """Raise ValueError when the layer implementation cannot run here (``LoopConfig`` checks the
    layout, ``n_layers`` and the MeSH settings)."""
    del seq_len
    lm.layer_function(config)


def extra_params(config: ModelConfig) -> int:
    """Parameters beyond the stored blocks, norm, embedding and head: MeSH routers, or the
    trainable hand-off coefficients (else 0)."""
    if config.loop.handoff == "mesh":
        return router_params(config.d_model, layout(config).n_loop, n_slots(config))
    return config.loop.alpha_params(config)


def init_params(config: ModelConfig, key: jax.Array) -> PyTree:
    """Random parameters: the standard init with depth-aware output projections, plus routers.

    w_o and w_ff_out of every stored layer get std 1/sqrt(2 * fan_in * compute_depth) (the
    paper's 1/sqrt(2 N_compute) rule on our 1/sqrt(fan_in) base; ``output_init="auto"`` or
    ``"depth"``) instead of the standard per-layer 1/sqrt(2 fan_in (l+1)) (``"layer"``). MeSH
    routers: truncated normal, std sqrt(2/(S*D)), zero bias. Alphas: static 1; dynamic w 0, b 1
    (both start as the fixed combination).
    """
    k_std, k_write, k_read = jax.random.split(key, 3)
    params = lm.init_standard_params(config, k_std)
    if config.output_init != "layer":
        params = depth_aware_outputs(params, config, compute_depth(config))
    loop = config.loop
    n_loop = layout(config).n_loop
    if loop.handoff == "mesh":
        d, s, pairs = config.d_model, n_slots(config), n_loop + 1
        std = math.sqrt(2.0 / (s * d))

        def draw(k: jax.Array) -> jax.Array:
            return std * jax.random.truncated_normal(k, -3.0, 3.0, (pairs, d, s), jnp.float32)

        params["routers"] = {
            "w_write": draw(k_write),
            "b_write": jnp.zeros((pairs, s), jnp.float32),
            "w_read": draw(k_read),
            "b_read": jnp.zeros((pairs, s), jnp.float32),
        }
    elif loop.alpha == "static":
        params["alphas"] = {"scale": jnp.ones((n_loop, loop.n_alphas), jnp.float32)}
    elif loop.alpha == "dynamic":
        params["alphas"] = {
            "w": jnp.zeros((n_loop, config.d_model, loop.n_alphas), jnp.float32),
            "b": jnp.ones((n_loop, loop.n_alphas), jnp.float32),
        }
    return params


def embed_inputs(params: PyTree, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """Token embeddings e (times sqrt(D) when ``config.embed_scale``): prelude input and M_0."""
    return _standard_embed_inputs(params, tokens, config)


def handoff_coefficients(
    loop: LoopConfig, alphas_t: PyTree, h: jax.Array
) -> jax.Array | tuple[float, ...]:
    """Coefficients (A,) or (..., A) of f(h^(t)) and the hand-off's terms at one loop step:
    all 1 ("fixed"), the step's scalars ("static"), or h^(t) W_t + b_t per token ("dynamic")."""
    if loop.alpha == "fixed":
        return (1.0,) * loop.n_alphas
    if loop.alpha == "static":
        return alphas_t["scale"]
    acc = jnp.promote_types(h.dtype, jnp.float32)
    w, b = alphas_t["w"].astype(acc), alphas_t["b"].astype(acc)
    return jnp.einsum("...d,da->...a", h.astype(acc), w) + b


def combine(
    loop: LoopConfig, coeffs: Any, out: jax.Array, terms: dict[str, jax.Array]
) -> jax.Array:
    """h^(t+1) = c_0 f(h^(t)) + sum_i c_i term_i over the hand-off's terms (Eq. 1, Table 4)."""
    if loop.alpha == "fixed":  # exact sums, no multiplications by 1
        h_next = out
        for name in loop.terms:
            h_next = h_next + terms[name]
        return h_next

    def weight(i: int, x: jax.Array) -> jax.Array:
        c = coeffs[..., i]
        return (c[..., None] if c.ndim else c).astype(x.dtype) * x

    h_next = weight(0, out)
    for i, name in enumerate(loop.terms, start=1):
        h_next = h_next + weight(i, terms[name])
    return h_next


def route(routers: PyTree, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write and read weights (..., S) of one router pair: softmax over slots of h W + b."""
    acc = jnp.promote_types(h.dtype, jnp.float32)

    def one(w: jax.Array, b: jax.Array) -> jax.Array:
        logits = jnp.einsum("...d,ds->...s", h.astype(acc), w.astype(acc)) + b.astype(acc)
        return jax.nn.softmax(logits, axis=-1)

    return one(routers["w_write"], routers["b_write"]), one(routers["w_read"], routers["b_read"])


def write_read(
    buffer_Sx: jax.Array, value: jax.Array, w_write: jax.Array, w_read: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """MeSH buffer update M_s += w_write,s * value, then the read sum_s w_read,s * M_s."""
    buffer_Sx = buffer_Sx + jnp.moveaxis(w_write, -1, 0)[..., None] * value[None]
    return buffer_Sx, jnp.sum(jnp.moveaxis(w_read, -1, 0)[..., None] * buffer_Sx, axis=0)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["states", "core_outputs", "write", "read"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LoopTrace:
    """What happened inside the loop: states h^(0..Nloop) (T+1, ...), core outputs f(h^(t))
    (T, ...), and for MeSH the router weights (T+1, ..., S), index 0 the transitional pair."""

    states: jax.Array
    core_outputs: jax.Array
    write: jax.Array | None
    read: jax.Array | None


def _take(tree: PyTree, start: int, stop: int) -> PyTree:
    return jax.tree.map(lambda a: a[start:stop], tree)


def recursive_hidden(
    params: PyTree,
    x_emb: jax.Array,
    config: ModelConfig,
    run_segment: SegmentFn,
    xs: PyTree = None,
    *,
    trace: bool = False,
) -> tuple[jax.Array, PyTree, LoopTrace | None]:
    """Final hidden state (before ``ln_f``), per-unrolled-layer outputs and an optional trace.

    ``x_emb`` is (..., D) (B x N x D for a forward, B x D for a decode step); ``run_segment`` runs
    a stack of layers; ``xs`` holds per-unrolled-layer inputs (leading axis = compute depth, e.g.
    KV caches) or None. The outputs of ``run_segment`` are concatenated in unrolled order.
    """
    lay = layout(config)
    p, c, n_loop = lay.prelude, lay.core, lay.n_loop
    blocks = params["blocks"]
    core_blocks = _take(blocks, p, p + c)  # tied: the one core every step runs
    step_blocks = None  # untied: (Nloop, Lcore, ...) per-step cores, scanned over
    if not lay.tied:
        step_blocks = jax.tree.map(
            lambda a: a[p : p + n_loop * c].reshape(n_loop, c, *a.shape[1:]), blocks
        )
    ys: list[PyTree] = []
    h = x_emb
    if p:
        h, y = run_segment(h, _take(blocks, 0, p), _take(xs, 0, p))
        ys.append(y)
    mesh = config.loop.handoff == "mesh"
    buffer, write0, read0, step_routers = None, None, None, None
    if mesh:
        routers = params["routers"]
        buffer = jnp.zeros((n_slots(config), *x_emb.shape), h.dtype).at[0].set(x_emb)
        write0, read0 = route(jax.tree.map(lambda a: a[0], routers), h)  # on f_pre(e)
        buffer, h = write_read(buffer, h, write0, read0)
        step_routers = _take(routers, 1, n_loop + 1)
    h0 = h
    xs_core = jax.tree.map(lambda a: a[p : p + n_loop * c].reshape(n_loop, c, *a.shape[1:]), xs)
    loop = config.loop
    alphas = params.get("alphas")

    def step(carry: tuple, inputs: tuple) -> tuple[tuple, tuple]:
        h, buffer = carry
        routers_t, alphas_t, blocks_t, xs_t = inputs
        out, y = run_segment(h, core_blocks if blocks_t is None else blocks_t, xs_t)
        w_w = w_r = None
        if mesh:
            w_w, w_r = route(routers_t, h)  # from the step input h^(t)
            buffer, h_next = write_read(buffer, out, w_w, w_r)
        else:
            coeffs = handoff_coefficients(loop, alphas_t, h)  # dynamic: from h^(t)
            terms = {"residual": h, "anchor": h0, "anchor-emb": x_emb}
            h_next = combine(loop, coeffs, out, terms)
        seen = (h_next, out, w_w, w_r) if trace else None
        return (h_next, buffer), (y, seen)

    (h, _), (y_core, seen) = jax.lax.scan(
        step, (h, buffer), (step_routers, alphas, step_blocks, xs_core), length=n_loop
    )
    ys.append(jax.tree.map(lambda a: a.reshape(n_loop * c, *a.shape[2:]), y_core))
    if lay.coda:
        coda_blocks = _take(blocks, p + lay.core_stored, lay.distinct_layers)
        h, y = run_segment(h, coda_blocks, _take(xs, lay.depth - lay.coda, lay.depth))
        ys.append(y)
    outputs = None
    if jax.tree.leaves(ys):
        outputs = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *ys)
    loop_trace = None
    if trace:
        states, core_out, w_w, w_r = seen
        stack = lambda first, rest: jnp.concatenate([first[None], rest], axis=0)  # noqa: E731
        loop_trace = LoopTrace(
            states=stack(h0, states),
            core_outputs=core_out,
            write=stack(write0, w_w) if mesh else None,
            read=stack(read0, w_r) if mesh else None,
        )
    return h, outputs, loop_trace


def _layer_fn(config: ModelConfig) -> Callable:
    fn = lm.layer_function(config)
    return jax.checkpoint(fn, static_argnums=(2,)) if config.remat else fn


def forward_segment(config: ModelConfig) -> SegmentFn:
    """A ``SegmentFn`` that scans plain layers over B x N x D states (no per-layer outputs)."""
    fn, spec = _layer_fn(config), config.attention_spec()

    def run(h: jax.Array, blocks: PyTree, xs: PyTree) -> tuple[jax.Array, None]:
        del xs

        def body(x: jax.Array, layer_params: PyTree) -> tuple[jax.Array, None]:
            return fn(layer_params, x, spec), None

        return jax.lax.scan(body, h, blocks)[0], None

    return run


def forward_hidden(
    params: PyTree, tokens_BxN: jax.Array, config: ModelConfig, *, trace: bool = False
) -> tuple[jax.Array, LoopTrace | None]:
    """Final hidden states B x N x D (before ``ln_f``) and, if asked, the loop trace."""
    x = embed_inputs(params, tokens_BxN, config)
    h, _, loop_trace = recursive_hidden(params, x, config, forward_segment(config), trace=trace)
    return h, loop_trace


def forward(params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits (B, N, embedding_size), float32, of the recursive model."""
    return lm.head(params, forward_hidden(params, tokens_BxN, config)[0], config)


def prefill(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    config: ModelConfig,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
    """Logits (B, E) of each row's last prompt token and a KV cache with one layer per unrolled
    layer (right-padded prompts, see ``rt_jax.decoding``)."""
    fn, spec = _layer_fn(config), config.attention_spec()
    recurrent = config.block_type == "recurrent"

    def run(h: jax.Array, blocks: PyTree, xs: PyTree) -> tuple[jax.Array, PyTree]:
        def body(x: jax.Array, layer_params: PyTree) -> tuple[jax.Array, tuple]:
            z, k, v = prefill_layer(layer_params, x, fn, spec, recurrent=recurrent)
            return z, (k, v)

        return jax.lax.scan(body, h, blocks)

    x = embed_inputs(params, tokens_BxP, config)
    h_BxPxD, (k, v), _ = recursive_hidden(params, x, config, run)
    b = tokens_BxP.shape[0]
    logits = lm.head(params, h_BxPxD[jnp.arange(b), lengths_B - 1], config)
    return logits, prefilled_cache(config, k, v, lengths_B, cache_size)


def decode_step(
    params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """One token per row at its next position through every unrolled layer: logits (B, E), cache.

    The MeSH buffer of the new token is rebuilt inside the step (it is per token, never cached).
    """
    spec = config.attention_spec()
    recurrent = config.block_type == "recurrent"
    pos_B = cache.lengths

    def run(h: jax.Array, blocks: PyTree, xs: PyTree) -> tuple[jax.Array, PyTree]:
        def body(x: jax.Array, layer: tuple) -> tuple[jax.Array, tuple]:
            layer_params, k_l, v_l = layer
            z, k_new, v_new = decode_layer(
                layer_params, x, k_l, v_l, pos_B, spec, recurrent=recurrent
            )
            return z, (k_new, v_new)

        return jax.lax.scan(body, h, (blocks, *xs))

    x = embed_inputs(params, tokens_B, config)
    h_BxD, (k_new, v_new), _ = recursive_hidden(params, x, config, run, (cache.k, cache.v))
    logits = lm.head(params, h_BxD, config)
    return logits, KVCache(
        write_cache_entries(cache.k, k_new, pos_B),
        write_cache_entries(cache.v, v_new, pos_B),
        pos_B + 1,
        cache.memory,
    )


def extra_forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Router matmul FLOPs per token (2 * D * S per router, 2 routers per pair), or the dynamic
    alphas' 2 * D * A per loop step; 0 otherwise."""
    del seq_len
    n_loop = layout(config).n_loop
    if config.loop.handoff == "mesh":
        return float(2 * 2 * (n_loop + 1) * config.d_model * n_slots(config))
    if config.loop.alpha == "dynamic":
        return float(2 * n_loop * config.d_model * config.loop.n_alphas)
    return 0.0


PARTITION_RULES: PartitionRules = (
    # MeSH routers: (Nloop+1, D, S) weights, (Nloop+1, S) biases. Tiny (61k for the paper's 1.4B),
    # so replicated.
    (r"^routers/w_(write|read)$", ("layers", None, None)),
    (r"^routers/b_(write|read)$", ("layers", None)),
    # Trainable hand-off coefficients (static: Nloop x A; dynamic: Nloop x D x A, Nloop x A).
    (r"^alphas/(scale|b)$", ("layers", None)),
    (r"^alphas/w$", ("layers", None, None)),
)
"""Logical axes of the MeSH routers and the hand-off coefficients."""


class RecursiveFamily(StandardFamily):
    """The recursive family (looped layouts, MeSH); training and validation are plain CE."""

    name = "recursive"
    validate = staticmethod(validate)
    init_params = staticmethod(init_params)
    forward = staticmethod(forward)
    prefill = staticmethod(prefill)
    decode_step = staticmethod(decode_step)
    extra_params = staticmethod(extra_params)
    extra_forward_flops_per_token = staticmethod(extra_forward_flops_per_token)

    def partition_rules(self) -> PartitionRules:
        """The standard rules plus the routers'."""
        return STANDARD_RULES + PARTITION_RULES


FAMILY = register_family(RecursiveFamily())


# --------------------------------------------------------------------------------------------
# The MeSH paper's models: Pythia (GPT-NeoX) shapes built by this library.

PYTHIA_SHAPES = {
    "160m": (12, 768, 12),
    "410m": (24, 1024, 16),
    "1b": (16, 2048, 8),
    "1.4b": (24, 2048, 16),
}
"""Pythia's (layers, d_model, heads) per size (Biderman et al. 2023); MLP 4D, vocab 50,257 padded
to 50,304 rows, rotary on 25% of each head, untied embedding and head."""

PYTHIA_VOCAB, PYTHIA_EMBEDDING_ROWS = 50_257, 50_304


def pythia_config(
    size: str,
    layout: str = "",
    handoff: str = "base",
    *,
    mesh_slots: int | None = None,
    tie_core: bool = True,
    **changes: Any,
) -> ModelConfig:
    """The NeoX-block ``ModelConfig`` of a Pythia ``size`` ("160m", "410m", "1b", "1.4b"): the
    vanilla model (``layout=""``) or a recursive layout of the same compute depth, with the paper's
    embedding scale; ``changes`` override other fields (e.g. ``compute_dtype="bfloat16"``)."""
    if size not in PYTHIA_SHAPES:
        raise ValueError(f"size={size!r}: expected one of {tuple(PYTHIA_SHAPES)}")
    depth, d, heads = PYTHIA_SHAPES[size]
    loop = LoopConfig()
    n_layers = depth
    if layout:
        loop = LoopConfig(layout, handoff, mesh_slots, tie_core=tie_core)
        lay = loop.parsed()
        if lay.depth != depth:
            raise ValueError(
                f"layout={layout!r} has compute depth {lay.depth}, not Pythia-{size}'s {depth}: "
                f"pick a layout with Lpre + Nloop*Lcore + Lcoda = {depth}"
            )
        n_layers = lay.distinct_layers
    fields: dict[str, Any] = dict(
        vocab_size=PYTHIA_VOCAB,
        embedding_size=PYTHIA_EMBEDDING_ROWS,
        d_model=d,
        n_heads=heads,
        n_layers=n_layers,
        mlp_hidden=4 * d,
        block_type="transformer",
        block_style="neox",
        position="rope",
        rotary_pct=0.25,
        embed_scale=True,
        loop=loop,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def model_param_counts(config: ModelConfig) -> dict[str, int]:
    """{"total", "non_embedding", "router"} counted from the leaves of ``init_params`` (traced
    with ``jax.eval_shape``: nothing is allocated, so the paper's 1.4B counts in milliseconds)."""
    shapes = jax.eval_shape(lambda k: lm.init_params(config, k), jax.random.key(0))
    sizes = {
        "/".join(str(getattr(k, "key", k)) for k in path): math.prod(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }
    total = sum(sizes.values())
    router = sum(v for k, v in sizes.items() if k.startswith("routers/"))
    return {
        "total": total,
        "non_embedding": total - sizes["embed"] - sizes["head"],
        "router": router,
    }

"""Tile operations backed by the Pallas kernels in ``pallas_kernels.rt_tiles`` (the one adapter).

Mosaic and Triton calls cannot be partitioned by XLA, so every kernel call runs under
``jax.shard_map`` over the mesh in context (``jax.sharding.get_abstract_mesh()``; the train step
sets it): batch rows over the data/fsdp axes, heads over the tensor axis, so each device runs
the kernel on its own rows and heads. An axis is used only when it divides the tile (else the
tile is replicated along it). Without a mesh in context the kernels are called directly.

The backend follows the target devices (the context mesh's platform and device kind), so a
TPU topology's train step compiles the Mosaic kernels from a CPU host, with the chip's config.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.rt_tiles import fenwick_gpu, fenwick_tpu, leaf_bwd_tpu, leaf_tpu
from pallas_kernels.rt_tiles.api import target_device, tile_kernels
from pallas_kernels.rt_tiles.config import GpuTileConfig, TpuTileConfig, tpu_config_for
from pallas_kernels.rt_tiles.contract import TileSpec
from rt_jax.ops.block import AttentionSpec, alibi_slopes
from rt_jax.ops.tiles import SoftmaxState, TileOps

BATCH_AXES = ("data", "fsdp")  # the mesh axes rt_jax.train.sharding splits the batch over
HEAD_AXIS = "tensor"  # the mesh axis attention heads are split over


def tile_partition(
    mesh, batch: int, heads: int, kv_heads: int
) -> tuple[tuple[str, ...], str | None]:
    """(batch axes, head axis) a tile of ``batch`` rows and ``heads``/``kv_heads`` heads uses.

    Batch axes are taken in order while their sizes multiply to a divisor of ``batch``; the head
    axis only when it divides both head counts. Axes already manual (an enclosing shard_map) are
    left alone.
    """
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    sizes = dict(mesh.shape)
    batch_axes: list[str] = []
    for axis in BATCH_AXES:
        if axis in free and sizes[axis] > 1:
            shards = math.prod(sizes[a] for a in batch_axes) * sizes[axis]
            if batch % shards == 0:
                batch_axes.append(axis)
    head = HEAD_AXIS if HEAD_AXIS in free and sizes[HEAD_AXIS] > 1 else None
    if head is not None and (heads % sizes[head] or kv_heads % sizes[head]):
        head = None
    return tuple(batch_axes), head


@dataclasses.dataclass(frozen=True)
class ShardedKernel:
    """One tile kernel ("merge" or "grads") called per device under ``shard_map``."""

    kind: str
    backend: str | None
    interpret: bool
    config: TpuTileConfig | GpuTileConfig | None

    def _kernel(self):
        merge, grads, _ = tile_kernels(self.backend, interpret=self.interpret, config=self.config)
        return merge if self.kind == "merge" else grads

    def __call__(self, q, k, v, *rest):
        """``tiles.merge_block`` / ``tiles.block_grads`` arguments and results."""
        if self.kind == "merge":
            state, q_pos, k_pos, spec = rest
            tensors = tuple(state)  # acc, max, den
        else:
            *tensors, q_pos, k_pos, spec = rest  # g, lse, delta
        tile_spec = TileSpec.of(spec)
        kernel = self._kernel()

        def call(q, k, v, a, b, c, q_pos, k_pos, head_offset=0):
            args = ((a, b, c),) if self.kind == "merge" else (a, b, c)
            out = kernel(q, k, v, *args, q_pos, k_pos, tile_spec, head_offset=head_offset)
            return tuple(out)

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not _has_free_axis(mesh):
            out = call(q, k, v, *tensors, q_pos, k_pos)
        else:
            batch_axes, head = tile_partition(mesh, q.shape[0], q.shape[1], k.shape[1])
            h_local = q.shape[1] // (dict(mesh.shape)[head] if head else 1)

            def local(*args):
                offset = jax.lax.axis_index(head) * h_local if head else 0
                return call(*args, head_offset=offset)

            bh = P(batch_axes or None, head)
            out = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(bh,) * 6 + (P(), P()),
                out_specs=(bh,) * 3,
                check_vma=False,
            )(q, k, v, *tensors, q_pos, k_pos)
        return SoftmaxState(*out) if self.kind == "merge" else out


@dataclasses.dataclass(frozen=True)
class ShardedFenwick:
    """An in-place Fenwick-block kernel ("merge" or "grads") on the scan's leaf-major buffers
    (leaf axis first, then batch, then heads), under ``shard_map``: ``rt_tiles.fenwick_tpu``
    (backend "tpu") or ``rt_tiles.fenwick_gpu`` (backend "gpu")."""

    kind: str
    interpret: bool
    config: TpuTileConfig | GpuTileConfig | None
    backend: str = "tpu"

    def supports(self, q_l: jax.Array) -> bool:
        """TPU: leaves of whole sublane tiles (``fenwick_tpu.supported``), else the window calls.
        GPU: every leaf (short leaves run in masked 16-row chunks); the head size is checked by
        the kernel, as by the Triton tile kernels."""
        if self.backend == "gpu":
            return True
        return fenwick_tpu.supported(q_l.shape[3], q_l.dtype)

    def __call__(self, *args):
        """``(q_l, k_l, v_l, state, m, spec)`` (merge) or ``(tensors, grads, m, spec)`` (grads)."""
        *arrays, m, spec = args
        tile_spec = TileSpec.of(spec)
        if self.backend == "gpu":
            module, config = fenwick_gpu, self.config
        else:
            _, kind = target_device()
            module = fenwick_tpu
            config = tpu_config_for(kind) if self.config is None else self.config
        fn = module.fenwick_merge if self.kind == "merge" else module.fenwick_grads
        if self.kind == "merge":
            q_l, k_l, v_l, state = arrays
            flat = (q_l, k_l, v_l, *state)
        else:
            tensors, grads = arrays
            flat = (*tensors, *grads)
            q_l, k_l = tensors[0], tensors[1]

        def call(m, *flat, head_offset=0):
            if self.kind == "merge":
                q, k, v, *st = flat
                out = fn(q, k, v, tuple(st), m, tile_spec, config=config,
                         interpret=self.interpret, head_offset=head_offset)  # fmt: skip
            else:
                out = fn(tuple(flat[:6]), tuple(flat[6:]), m, tile_spec, config=config,
                         interpret=self.interpret, head_offset=head_offset)  # fmt: skip
            return tuple(out)

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not _has_free_axis(mesh):
            return call(m, *flat)
        batch_axes, head = tile_partition(mesh, q_l.shape[1], q_l.shape[2], k_l.shape[2])
        h_local = q_l.shape[2] // (dict(mesh.shape)[head] if head else 1)

        def local(m, *flat):
            offset = jax.lax.axis_index(head) * h_local if head else 0
            return call(m, *flat, head_offset=offset)

        lbh = P(None, batch_axes or None, head)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(),) + (lbh,) * len(flat),
            out_specs=(lbh,) * 3,
            check_vma=False,
        )(m, *flat)


@dataclasses.dataclass(frozen=True)
class LeafKernel:
    """The forward's per-leaf pull step as one Mosaic call (``rt_tiles.leaf_tpu``): all L
    positions with state, the leaf's keys/values and the weights in VMEM. Under a mesh the batch
    is split over the data/fsdp axes (``tile_partition``); heads are not split (the call holds the
    whole layer's weights), so a tensor axis replicates it."""

    interpret: bool

    def supports(self, params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int) -> bool:
        """Leaves of whole sublane tiles of the compute dtype (the Fenwick kernels' rule,
        ``fenwick_tpu.supported``) and one call's VMEM under ``leaf_tpu.VMEM_CAP_BYTES``."""
        if spec.neox:
            raise ValueError("the leaf kernel implements the OLMo block; the RT refuses neox")
        b, _, d = x_BxNxD.shape
        f = params["w_ff_in"].shape[1]
        acc = _acc_dtype(x_BxNxD.dtype)
        return fenwick_tpu.supported(leaf, spec.dtype) and leaf_tpu.fits(
            leaf, b, d, f, _leaf_spec(spec), spec.dtype, x_BxNxD.dtype, acc
        )

    def prepare(self, params, spec: AttentionSpec, acc) -> leaf_tpu.LeafWeights:
        """The kernel's weights (compute dtype) and selection matrices, once per layer call."""
        dt = spec.dtype
        h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        gk = g * kd
        w_kv = params["w_kv"].astype(dt)
        return leaf_tpu.LeafWeights(
            w_o=params["w_o"].astype(dt),
            w_ff_in=params["w_ff_in"].astype(dt),
            w_ff_out=params["w_ff_out"].astype(dt),
            w_k=w_kv[:, :gk],
            w_v=w_kv[:, gk:],
            attn_norm=params["attn_norm"].reshape(1, -1),
            ff_norm=params["ff_norm"].reshape(1, -1),
            k_norm=params["k_norm"].reshape(1, -1),
            e=leaf_tpu.head_indicator(h, kd, acc),
            rep=leaf_tpu.kv_repeat(h, g, kd, dt) if g != h else None,
            rot=leaf_tpu.rotate_half(g, kd, spec.rotary_dims, dt)
            if spec.position == "rope"
            else None,
            neg_slopes=(-alibi_slopes(h, spec.alibi_bias_max).astype(acc)).reshape(1, 1, h)
            if spec.position == "alibi"
            else None,
        )

    def __call__(self, weights, x_LxBxD, q_LxBxHxK, state_pm, start, spec: AttentionSpec):
        """One leaf: (z L x B x D, lse L x B x H, k and v B x G x L x K) from its inputs and its
        position-major state (acc L x B x H x K, max/den L x B x H); ``start`` = i L."""
        leaf, b, _ = x_LxBxD.shape
        h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        acc, mx, den = state_pm
        q = q_LxBxHxK.reshape(leaf, b, h * kd)
        acc = acc.reshape(leaf, b, h * kd)
        rope = ()
        if spec.position == "rope":
            pos = start + jnp.arange(leaf)
            rope = leaf_tpu.rope_tables(pos, g, kd, spec.rotary_dims, spec.rope_theta, acc.dtype)
        lspec = _leaf_spec(spec)

        def call(x, q, acc, mx, den, *rope):
            bl = x.shape[1]
            pad = -bl % leaf_tpu.SUBLANES
            if pad:
                widths = ((0, 0), (0, pad), (0, 0))
                x, q, acc, mx = (jnp.pad(a, widths) for a in (x, q, acc, mx))
                den = jnp.pad(den, widths, constant_values=1)
            out = leaf_tpu.leaf_forward(
                x, q, (acc, mx, den), weights, rope or None, lspec, interpret=self.interpret
            )
            return tuple(a[:, :bl] for a in out)

        mesh = jax.sharding.get_abstract_mesh()
        args = (x_LxBxD, q, acc, mx, den, *rope)
        if mesh.empty or not _has_free_axis(mesh):
            z, lse, k, v = call(*args)
        else:
            batch_axes, _ = tile_partition(mesh, b, h, g)
            lb = P(None, batch_axes or None)
            z, lse, k, v = jax.shard_map(
                call,
                mesh=mesh,
                in_specs=(lb,) * 5 + (P(),) * len(rope),
                out_specs=(lb,) * 4,
                check_vma=False,
            )(*args)
        k, v = (a.reshape(leaf, b, g, kd).transpose(1, 2, 0, 3) for a in (k, v))
        return z, lse, k, v


@dataclasses.dataclass(frozen=True)
class LeafBackwardKernel:
    """The backward's per-leaf reverse position loop as one Mosaic call (``rt_tiles.leaf_bwd_tpu``):
    all L positions with the leaf's queries, log-sum-exp, g/delta rows and the transposed weights
    in VMEM. Applies where ``LeafKernel`` does (same rule, its own VMEM check); under a mesh the
    batch is split over the data/fsdp axes and heads are not split, as for ``LeafKernel``."""

    interpret: bool

    def supports(self, params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int) -> bool:
        """Leaves of whole sublane tiles of the compute dtype (``fenwick_tpu.supported``) and one
        call's VMEM under ``leaf_tpu.VMEM_CAP_BYTES``."""
        if spec.neox:
            raise ValueError("the leaf kernel implements the OLMo block; the RT refuses neox")
        b, _, d = x_BxNxD.shape
        f = params["w_ff_in"].shape[1]
        acc = _acc_dtype(x_BxNxD.dtype)
        return fenwick_tpu.supported(leaf, spec.dtype) and leaf_bwd_tpu.fits(
            leaf, b, d, f, _leaf_spec(spec), spec.dtype, x_BxNxD.dtype, acc
        )

    def prepare(self, params, spec: AttentionSpec, acc) -> leaf_bwd_tpu.LeafBackWeights:
        """The kernel's transposed weights (compute dtype) and selection matrices, once per
        layer backward."""
        dt = spec.dtype
        h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        gk = g * kd
        w_kv = params["w_kv"].astype(dt)
        rep = leaf_tpu.kv_repeat(h, g, kd, dt) if g != h else None
        return leaf_bwd_tpu.LeafBackWeights(
            w_o_t=params["w_o"].astype(dt).T,
            w_ff_in_t=params["w_ff_in"].astype(dt).T,
            w_ff_out_t=params["w_ff_out"].astype(dt).T,
            w_k_t=w_kv[:, :gk].T,
            w_v_t=w_kv[:, gk:].T,
            attn_norm=params["attn_norm"].reshape(1, -1),
            ff_norm=params["ff_norm"].reshape(1, -1),
            k_norm=params["k_norm"].reshape(1, -1),
            e=leaf_tpu.head_indicator(h, kd, acc),
            rep=rep,
            rep_t=rep.T.astype(acc) if rep is not None else None,
            rot_t=leaf_tpu.rotate_half(g, kd, spec.rotary_dims, dt).T
            if spec.position == "rope"
            else None,
            neg_slopes=(-alibi_slopes(h, spec.alibi_bias_max).astype(acc)).reshape(1, 1, h)
            if spec.position == "alibi"
            else None,
        )

    def __call__(self, weights, q_LxBxHxK, lse_LxBxH, ys, start, spec: AttentionSpec):
        """One leaf (``tiled_backward.leaf_backward_positions`` arguments, with q and lse
        position-major L x B x H (x K)): (dz, dhidden, dx1, g, delta, dk, dv), L x B x ...."""
        leaf, b, h, kd = q_LxBxHxK.shape
        g = spec.n_kv_heads
        q = q_LxBxHxK.reshape(leaf, b, h * kd)
        flat = [a.reshape(leaf, b, -1) for a in ys]  # heads into lanes (att, k, v, dk, dv)
        rope = ()
        if spec.position == "rope":
            pos = start + jnp.arange(leaf)
            rope = leaf_tpu.rope_tables(
                pos, g, kd, spec.rotary_dims, spec.rope_theta, lse_LxBxH.dtype
            )
        lspec = _leaf_spec(spec)
        n_in = 2 + len(flat)

        def call(*args):
            arrays, rope = args[:n_in], args[n_in:]
            bl = arrays[0].shape[1]
            pad = -bl % leaf_tpu.SUBLANES
            if pad:
                widths = ((0, 0), (0, pad), (0, 0))
                arrays = tuple(jnp.pad(a, widths) for a in arrays)
            q, lse, *rest = arrays
            out = leaf_bwd_tpu.leaf_backward(
                q, lse, tuple(rest), weights, rope or None, lspec, interpret=self.interpret
            )
            return tuple(a[:, :bl] for a in out)

        mesh = jax.sharding.get_abstract_mesh()
        args = (q, lse_LxBxH, *flat, *rope)
        if mesh.empty or not _has_free_axis(mesh):
            outs = call(*args)
        else:
            batch_axes, _ = tile_partition(mesh, b, h, g)
            lb = P(None, batch_axes or None)
            outs = jax.shard_map(
                call,
                mesh=mesh,
                in_specs=(lb,) * n_in + (P(),) * len(rope),
                out_specs=(lb,) * 7,
                check_vma=False,
            )(*args)
        dz, dhid, dx1, g_t, delta, dk, dv = outs
        return (
            dz,
            dhid,
            dx1,
            g_t.reshape(leaf, b, h, kd),
            delta,
            dk.reshape(leaf, b, g, kd),
            dv.reshape(leaf, b, g, kd),
        )


def _leaf_spec(spec: AttentionSpec) -> leaf_tpu.LeafSpec:
    return leaf_tpu.LeafSpec(
        spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.position, spec.norm_eps
    )


def _acc_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _has_free_axis(mesh) -> bool:
    """A non-manual axis of size > 1: XLA would try (and fail) to partition the kernel."""
    return any(size > 1 for axis, size in dict(mesh.shape).items() if axis not in mesh.manual_axes)


def pallas_tile_ops(
    interpret: bool,
    backend: str | None = None,
    config: TpuTileConfig | GpuTileConfig | None = None,
    block_calls: bool = True,
    leaf_kernel: bool = True,
) -> TileOps:
    """A ``TileOps`` whose merge/grads are the Pallas kernels, sharded over the context mesh.

    ``backend`` is "tpu" (Mosaic) or "gpu" (Triton); None picks the target platform's own (the
    context mesh's devices, else JAX's backend), and the TPU kernels in interpret mode on CPU.
    ``config`` None picks the target chip's config. ``block_calls`` makes the tiled scan call the
    kernels once per Fenwick block (key block resident on chip) rather than once per leaf pair;
    those calls are the in-place kernels on the leaf-major buffers (m as an operand,
    state/gradients aliased): ``rt_tiles.fenwick_tpu`` on TPU (window calls for leaves that are
    not whole sublane tiles), ``rt_tiles.fenwick_gpu`` on GPU.
    ``leaf_kernel`` (TPU only) runs the forward's per-leaf pull step and the backward's per-leaf
    reverse position loop as one Mosaic call each (``LeafKernel``, ``LeafBackwardKernel``) where
    they apply; False keeps both jnp position loops.
    Raises ValueError when the choice cannot run on the target.
    """
    _, _, name = tile_kernels(backend, interpret=interpret, config=config)
    mode = "interpret" if interpret else "compiled"
    fenwick = block_calls
    return TileOps(
        merge=ShardedKernel("merge", backend, interpret, config),
        grads=ShardedKernel("grads", backend, interpret, config),
        name=f"pallas-{name}-{mode}",
        block_calls=block_calls,
        fenwick_merge=ShardedFenwick("merge", interpret, config, name) if fenwick else None,
        fenwick_grads=ShardedFenwick("grads", interpret, config, name) if fenwick else None,
        leaf_forward=LeafKernel(interpret) if name == "tpu" and leaf_kernel else None,
        leaf_backward=LeafBackwardKernel(interpret) if name == "tpu" and leaf_kernel else None,
    )

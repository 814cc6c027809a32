"""Device mesh and partitioning rules (parameter path -> logical axes -> mesh axes), as data."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rt_jax.models.family import registered_families
from rt_jax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter path (regex over "a/b/c") -> logical axis names, one per dimension: the rules of every
# registered model family (``ModelFamily.partition_rules``), first match wins. Blocks are stacked
# on a leading "layers" axis that is never sharded.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = tuple(
    dict.fromkeys(rule for family in registered_families() for rule in family.partition_rules())
)

# Logical axis -> mesh axis (None = replicated). Columns of w_q/w_kv/w_ff_in and rows of
# w_o/w_ff_out go to "tensor" (Megatron style); the model dimension is split over "fsdp".
LOGICAL_TO_MESH: dict[str, str | None] = {
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    "layers": None,
    "norm": None,
}

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices; the first ones
    when the configured sizes multiply to fewer)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    used = int(np.prod(shape))
    if used < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh sizes {shape} use {used} of {len(devices)} devices; a multi-process run "
                "must use all of them: set one of mesh.data/fsdp/tensor to -1"
            )
        devices = devices[:used]
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def path_name(path: tuple[Any, ...]) -> str:
    """ "blocks/w_q" for a pytree key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at ``name`` (ValueError if no rule matches)."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, name):
            if len(axes) != ndim:
                raise ValueError(f"partition rule {pattern!r} has {len(axes)} axes, {name} {ndim}")
            return axes
    raise ValueError(
        f"no partitioning rule matches parameter {name!r}; add one to its model family's partition_rules"
    )


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Mesh partition spec of one parameter; an axis whose size the mesh axis does not divide is
    replicated instead (e.g. a 257-row byte vocabulary on 2 tensor shards)."""
    spec = []
    for size, logical in zip(shape, logical_axes(name, len(shape)), strict=True):
        axis = LOGICAL_TO_MESH.get(logical) if logical else None
        if axis is not None and (mesh.shape[axis] == 1 or size % mesh.shape[axis]):
            axis = None
        spec.append(axis)
    return PartitionSpec(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every parameter leaf, by the rules above."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_name(p), tuple(x.shape), mesh)),
        abstract_params,
    )


def tree_shardings_like_params(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree (e.g. optimizer state) whose leaves mirror parameters by path suffix;
    other leaves (counts, scalars) are replicated."""
    by_name = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_name[path_name(path)] = sharding
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for start in range(len(keys)):
            sharding = by_name.get("/".join(keys[start:]))
            if sharding is not None and len(sharding.spec) <= len(np.shape(leaf)):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over ("data", "fsdp"); positions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]

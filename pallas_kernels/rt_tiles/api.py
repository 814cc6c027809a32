"""Backend choice for the tile kernels: ``tile_kernels(backend, interpret)`` -> (merge, grads, name).

The platform is the one the program is compiled *for*: the devices of the mesh in context
(``jax.sharding.get_abstract_mesh()``, which ``jax.sharding.use_abstract_mesh`` / ``jax.set_mesh``
set), else JAX's default backend. So a TPU topology's mesh compiles the Mosaic kernels from a CPU
host. The TPU block config follows the device kind (v5e, v6e, v5p) unless one is passed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from pallas_kernels.rt_tiles import gpu, tpu
from pallas_kernels.rt_tiles.config import GpuTileConfig, TpuTileConfig, tpu_config_for

BACKENDS = ("tpu", "gpu")
_PLATFORM_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def target_device() -> tuple[str, str | None]:
    """(platform, device kind) of the devices being compiled for: the context mesh's, else JAX's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform, mesh.abstract_device.device_kind
    device = jax.devices()[0]
    return device.platform, device.device_kind


def platform_backend(platform: str | None = None) -> str | None:
    """Kernel backend that runs natively on ``platform`` (default: the target's), or None (CPU)."""
    return _PLATFORM_BACKEND.get(platform or target_device()[0])


def resolve_backend(backend: str | None, interpret: bool, platform: str | None = None) -> str:
    """Check that ``backend`` can run on ``platform`` (default: the target's) and return it.

    None picks the platform's own. Raises ValueError on CPU without ``interpret=True`` and for a
    backend the platform cannot run.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}: expected one of {BACKENDS}")
    platform = platform or target_device()[0]
    native = _PLATFORM_BACKEND.get(platform)
    if interpret:
        return backend or native or "tpu"
    if native is None:
        raise ValueError(
            f"Pallas kernels cannot be compiled for the {platform!r} platform: pass "
            "interpret=True (ModelConfig(impl='pallas', interpret=True)) to run them in interpret "
            "mode, compile for a TPU/GPU mesh (jax.sharding.use_abstract_mesh), or use "
            "impl='tiled'"
        )
    if backend is not None and backend != native:
        raise ValueError(
            f"the {backend!r} Pallas kernels cannot run on the {platform!r} platform: "
            f"use backend={native!r} (or None), or interpret=True"
        )
    return native


def tile_kernels(
    backend: str | None = None,
    *,
    interpret: bool = False,
    config: TpuTileConfig | GpuTileConfig | None = None,
    platform: str | None = None,
    device_kind: str | None = None,
) -> tuple[Callable, Callable, str]:
    """The (merge, grads) kernels of a backend with the ``contract`` signatures, and its name.

    ``platform``/``device_kind`` default to the target devices'; they pick the backend and, when
    ``config`` is None, its block config (TPU: per chip kind; GPU: per tile size).
    """
    if platform is None:
        platform, kind = target_device()
        device_kind = device_kind or kind
    name = resolve_backend(backend, interpret, platform)
    if name == "tpu":
        module = tpu
        config = tpu_config_for(device_kind) if config is None else config
    else:  # None: the Triton kernels pick GPU_BY_SIZE's entry per tile
        module = gpu
    expected = TpuTileConfig if name == "tpu" else GpuTileConfig
    if config is not None and not isinstance(config, expected):
        raise ValueError(f"backend {name!r} needs a {expected.__name__}, got {config!r}")
    merge = functools.partial(module.merge, config=config, interpret=interpret)
    grads = functools.partial(module.grads, config=config, interpret=interpret)
    return merge, grads, name

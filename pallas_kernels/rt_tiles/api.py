"""Backend choice for the tile kernels: ``tile_kernels(backend, interpret)`` -> (merge, grads)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from pallas_kernels.rt_tiles import gpu, tpu
from pallas_kernels.rt_tiles.config import GPU_H100, TPU_V5E, GpuTileConfig, TpuTileConfig

BACKENDS = ("tpu", "gpu")
_PLATFORM_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}


def platform_backend(platform: str | None = None) -> str | None:
    """Kernel backend that runs natively on ``platform`` (default: JAX's), or None (e.g. CPU)."""
    return _PLATFORM_BACKEND.get(platform or jax.default_backend())


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """Check that ``backend`` can run here and return it (None picks the platform's own).

    Raises ValueError on CPU without ``interpret=True`` and for a backend the platform cannot run.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}: expected one of {BACKENDS}")
    native = platform_backend()
    if interpret:
        return backend or native or "tpu"
    if native is None:
        raise ValueError(
            f"Pallas kernels cannot be compiled for the {jax.default_backend()!r} platform: pass "
            "interpret=True (ModelConfig(impl='pallas', interpret=True)) to run them in interpret "
            "mode, or use impl='tiled'"
        )
    if backend is not None and backend != native:
        raise ValueError(
            f"the {backend!r} Pallas kernels cannot run on the {jax.default_backend()!r} platform: "
            f"use backend={native!r} (or None), or interpret=True"
        )
    return native


def tile_kernels(
    backend: str | None = None,
    *,
    interpret: bool = False,
    config: TpuTileConfig | GpuTileConfig | None = None,
) -> tuple[Callable, Callable, str]:
    """The (merge, grads) kernels of a backend with the ``rt_jax.ops.tiles`` signatures, and its name."""
    name = resolve_backend(backend, interpret)
    module, default = (tpu, TPU_V5E) if name == "tpu" else (gpu, GPU_H100)
    config = default if config is None else config
    expected = TpuTileConfig if name == "tpu" else GpuTileConfig
    if not isinstance(config, expected):
        raise ValueError(f"backend {name!r} needs a {expected.__name__}, got {config!r}")
    merge = functools.partial(module.merge, config=config, interpret=interpret)
    grads = functools.partial(module.grads, config=config, interpret=interpret)
    return merge, grads, name

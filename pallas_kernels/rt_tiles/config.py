"""Block sizes of the tile kernels, one small frozen dataclass per target."""

from __future__ import annotations

import dataclasses

TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class TpuTileConfig:
    """Mosaic TPU blocks: queries per grid step, keys per inner step, keys resident in VMEM.

    A kernel call holds all keys/values of its tile (up to ``max_resident_keys`` rows, padded to
    ``block_k``) in VMEM, so they are read from HBM once per (batch, kv head); a longer key block
    is split into several calls. Block sizes must be multiples of 128 (lane width).
    """

    block_q: int = 256
    block_k: int = 512
    max_resident_keys: int = 4096
    vmem_limit_bytes: int | None = None
    """Mosaic's scoped VMEM limit for these kernels (None: the compiler's default)."""
    heads_per_step: int | None = None
    """Query heads per grid step of the in-place Fenwick kernels (``fenwick_tpu``); None: all
    local heads whose resident keys fit half the VMEM limit. Must divide the local head count,
    be a multiple of the group size and equal it or be a multiple of 8 (sublane tiling)."""

    def __post_init__(self) -> None:
        if self.heads_per_step is not None and (
            not isinstance(self.heads_per_step, int) or self.heads_per_step <= 0
        ):
            raise ValueError(
                f"TpuTileConfig.heads_per_step={self.heads_per_step!r} must be a positive int "
                "or None"
            )
        if self.vmem_limit_bytes is not None and (
            not isinstance(self.vmem_limit_bytes, int) or self.vmem_limit_bytes <= 0
        ):
            raise ValueError(
                f"TpuTileConfig.vmem_limit_bytes={self.vmem_limit_bytes!r} must be a positive int "
                "or None"
            )
        for name in ("block_q", "block_k", "max_resident_keys"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % TPU_LANES:
                raise ValueError(
                    f"TpuTileConfig.{name}={value!r} must be a positive multiple of {TPU_LANES}"
                )
        if self.max_resident_keys % self.block_k:
            raise ValueError(
                f"TpuTileConfig.max_resident_keys={self.max_resident_keys} must be a multiple of "
                f"block_k={self.block_k}"
            )


@dataclasses.dataclass(frozen=True)
class GpuTileConfig:
    """Triton blocks: queries and keys per program step (powers of two >= 16), warps and stages."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"GpuTileConfig.{name}={value!r} must be a power of two >= 16")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"GpuTileConfig needs positive num_warps/num_stages, got {self}")


_MIB = 1024 * 1024
# Per chip (see docs/kernels.md): v5e and v5p have 128x128 MXUs, v6e 256x256 ones (larger query
# blocks); the VMEM limits stay well under each chip's VMEM and are checked by real compiles
# (tests/test_pallas_compile.py), not by runs.
TPU_V5E = TpuTileConfig(
    block_q=256, block_k=512, max_resident_keys=4096, vmem_limit_bytes=64 * _MIB
)
TPU_V6E = TpuTileConfig(
    block_q=512, block_k=512, max_resident_keys=4096, vmem_limit_bytes=96 * _MIB
)
TPU_V5P = TpuTileConfig(
    block_q=256, block_k=512, max_resident_keys=4096, vmem_limit_bytes=48 * _MIB
)
GPU_H100 = GpuTileConfig(block_q=64, block_k=64, num_warps=4, num_stages=2)

# Substrings of jax's device_kind, first match wins ("TPU v5 lite" is v5e, "TPU v5" is v5p).
_TPU_BY_KIND = (("v6", TPU_V6E), ("v5 lite", TPU_V5E), ("v5e", TPU_V5E), ("v5", TPU_V5P))


def tpu_config_for(device_kind: str | None) -> TpuTileConfig:
    """The block config of a TPU device kind ("TPU v5 lite", "TPU v6 lite", "TPU v5", ...).

    Unknown kinds (and None) get the v5e config, the smallest VMEM budget of the three.
    """
    kind = (device_kind or "").lower()
    for key, config in _TPU_BY_KIND:
        if key in kind:
            return config
    return TPU_V5E


# Triton configs keyed by the tile's size: (largest min(T, S) it serves, config). Small tiles get
# small blocks so a leaf tile is not padded to 64 rows; long blocks get more warps and stages.
GPU_BY_SIZE = (
    (32, GpuTileConfig(block_q=32, block_k=32, num_warps=2, num_stages=2)),
    (256, GpuTileConfig(block_q=64, block_k=64, num_warps=4, num_stages=2)),
    (1 << 62, GpuTileConfig(block_q=128, block_k=64, num_warps=8, num_stages=3)),
)


def gpu_config_for_tile(n_queries: int, n_keys: int) -> GpuTileConfig:
    """The entry of ``GPU_BY_SIZE`` for a tile of n_queries x n_keys."""
    size = min(n_queries, n_keys)
    for limit, config in GPU_BY_SIZE:
        if size <= limit:
            return config
    return GPU_BY_SIZE[-1][1]

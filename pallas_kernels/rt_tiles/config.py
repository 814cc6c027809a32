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

    def __post_init__(self) -> None:
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


TPU_V5E = TpuTileConfig()
TPU_V6E = TpuTileConfig(block_q=256, block_k=512, max_resident_keys=4096)
GPU_H100 = GpuTileConfig(block_q=64, block_k=64, num_warps=4, num_stages=2)

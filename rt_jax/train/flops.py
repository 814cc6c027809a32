"""Device peaks, HBM sizes and MFU. The analytic model FLOP formulas (matmuls only, causal
attention, 3x forward for training; conventions in ``rt_jax.models.flops``) live with the models,
which need them, and are re-exported here."""

from __future__ import annotations

import dataclasses

from rt_jax.models.flops import (
    TRAIN_FACTOR,
    causal_keys_per_query,
    forward_flops_per_token,
    head_forward_flops_per_token,
    layer_forward_flops_per_token,
    train_flops_per_step,
    train_flops_per_token,
)

__all__ = [
    "DEVICES",
    "TRAIN_FACTOR",
    "DeviceSpec",
    "causal_keys_per_query",
    "device_spec",
    "forward_flops_per_token",
    "hbm_bytes_per_device",
    "head_forward_flops_per_token",
    "layer_forward_flops_per_token",
    "mfu",
    "peak_flops_per_device",
    "train_flops_per_step",
    "train_flops_per_token",
]


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Published per-chip numbers: dense peak FLOP/s by dtype and HBM capacity in bytes."""

    name: str
    peak_bf16: float
    peak_fp32: float
    hbm_bytes: int


_GIB = 1024**3
_GB = 10**9
# Dense (no sparsity) peaks from the vendors' spec sheets. TPU float32 matmuls run as bf16 passes at
# JAX's default precision, so their float32 peak is taken as the bf16 peak. A GPU's float32 peak
# is its non-tensor-core FP32 rate.
DEVICES: dict[str, DeviceSpec] = {
    "tpu v4": DeviceSpec("TPU v4", 275e12, 275e12, 32 * _GIB),
    "tpu v5e": DeviceSpec("TPU v5e", 197e12, 197e12, 16 * _GIB),
    "tpu v5p": DeviceSpec("TPU v5p", 459e12, 459e12, 95 * _GIB),
    "tpu v6e": DeviceSpec("TPU v6e", 918e12, 918e12, 32 * _GIB),
    "h100 sxm": DeviceSpec("NVIDIA H100 SXM", 989.4e12, 66.9e12, 80 * _GB),
    "h100 pcie": DeviceSpec("NVIDIA H100 PCIe", 756.4e12, 51.2e12, 80 * _GB),
    "a100": DeviceSpec("NVIDIA A100", 312e12, 19.5e12, 80 * _GB),
}


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The table entry for a ``jax.Device.device_kind`` string (e.g. "TPU v5 lite"); None if unknown."""
    kind = device_kind.lower().strip()
    if "tpu" in kind:
        if "v6" in kind:
            return DEVICES["tpu v6e"]
        if "v5 lite" in kind or "v5e" in kind or "v5lite" in kind:
            return DEVICES["tpu v5e"]
        if "v5" in kind:  # "TPU v5" and "TPU v5p" are the v5p
            return DEVICES["tpu v5p"]
        if "v4" in kind:
            return DEVICES["tpu v4"]
        return None
    if "h100" in kind:
        return DEVICES["h100 pcie" if "pcie" in kind else "h100 sxm"]
    if "a100" in kind:
        return DEVICES["a100"]
    return None


def peak_flops_per_device(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one chip for matmuls in ``dtype``; None if unknown (e.g. CPU)."""
    if dtype not in ("bfloat16", "float16", "float32", "float64"):
        raise ValueError(
            f"dtype must be 'bfloat16', 'float16', 'float32' or 'float64', got {dtype!r}"
        )
    spec = device_spec(device_kind)
    if spec is None or dtype == "float64":  # no float64 peak in the table
        return None
    return spec.peak_fp32 if dtype == "float32" else spec.peak_bf16


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM capacity of one chip in bytes; None if unknown."""
    spec = device_spec(device_kind)
    return None if spec is None else spec.hbm_bytes


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' total peak (None if unknown)."""
    if n_devices <= 0:
        raise ValueError(f"n_devices must be positive, got {n_devices}")
    if peak_per_device is None or peak_per_device <= 0:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak_per_device)

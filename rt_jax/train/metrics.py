"""Metrics: JSONL + TensorBoard writer, log-spaced evaluation steps, throughput and MFU."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from rt_jax.config import ModelConfig
from rt_jax.train import flops

METRICS_FILE = "metrics.jsonl"


def eval_steps(steps: int, points: int) -> list[int]:
    """Step 0 plus ``points`` log-spaced steps in [1, steps] (always including ``steps``).

    ``points == 0`` means no evaluation. Duplicates after rounding are merged.
    """
    if points <= 0:
        return []
    spaced = np.geomspace(1, steps, num=points) if points > 1 else np.asarray([steps])
    return sorted({0, steps, *(int(round(x)) for x in spaced)})


def model_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Analytic forward+backward FLOPs per trained token."""
    return flops.train_flops_per_token(model, seq_len)


def model_flops_utilisation(
    tokens_per_s: float, flops_per_token: float, devices: list[Any], dtype: str
) -> float | None:
    """MFU over ``devices``; None when their peak is unknown (e.g. CPU)."""
    peak = flops.peak_flops_per_device(devices[0].device_kind, dtype)
    return flops.mfu(tokens_per_s, flops_per_token, len(devices), peak)


def _clean(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends JSON lines to ``<run_dir>/metrics.jsonl`` and scalars to TensorBoard (``tb/``).

    Only the writing process (process 0) touches files. On resume at ``start_step``, lines with a
    larger step (logged after the last checkpoint) are dropped so the file matches the state.
    """

    def __init__(self, run_dir: str | os.PathLike, *, active: bool, start_step: int):
        self.path = pathlib.Path(run_dir) / METRICS_FILE
        self.active = active
        self.history: list[dict] = []
        if self.path.exists():
            with open(self.path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            self.history = [r for r in lines if r.get("step", 0) <= start_step]
            if start_step == 0:
                self.history = []
            if active:
                tmp = self.path.with_suffix(".jsonl.tmp")
                with open(tmp, "w") as f:
                    for record in self.history:
                        f.write(json.dumps(record) + "\n")
                os.replace(tmp, self.path)
        self._tb = None
        if active:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tb"), purge_step=start_step)

    def write(self, record: dict[str, Any]) -> None:
        """Log one record (must hold "step")."""
        record = {k: _clean(v) for k, v in record.items()}
        self.history.append(record)
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()

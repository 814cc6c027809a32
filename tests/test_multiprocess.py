"""Two processes on localhost (CPU collectives, one device each) train ``tiny`` to the same losses
as one process with two devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rt_jax.train.config import apply_overrides, get_preset
from rt_jax.train.loop import train

OVERRIDES = ["steps=6", "log_every=1", "eval_points=2", "eval_batches=1", "checkpoint_every=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (
        np.asarray([r["loss"] for r in lines if "loss" in r]),
        np.asarray([r["val_ce"] for r in lines if "val_ce" in r]),
    )


@pytest.mark.slow  # two extra processes compile the train step: about a CPU-minute
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    procs, logs = [], []
    for pid in range(2):
        cmd = [sys.executable, "-m", "experiments.train", "--preset", "tiny"]
        cmd += ["--workdir", str(tmp_path / "multi"), "--no-progress"]
        for item in OVERRIDES + [
            "distributed=true",
            f"coordinator_address=127.0.0.1:{port}",
            "num_processes=2",
            f"process_id={pid}",
        ]:
            cmd += ["--set", item]
        log = open(tmp_path / f"proc{pid}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline = time.time() + 300
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # JAX catches SIGTERM; kill hard
                p.wait()
        for log in logs:
            log.close()
    logs = [(tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(2)]
    assert all(p.returncode == 0 for p in procs), logs

    cfg = apply_overrides(get_preset("tiny"), OVERRIDES + ["mesh.data=2"])
    train(cfg, tmp_path / "single", progress=False)
    multi_loss, multi_val = _losses(tmp_path / "multi")
    single_loss, single_val = _losses(tmp_path / "single")
    assert len(multi_loss) == 6 and len(multi_val) == 3
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(multi_val, single_val, rtol=1e-5)
    assert sorted(
        p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["3", "6"]

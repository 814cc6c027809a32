"""The training loop: resume, train, log, evaluate, checkpoint; stops cleanly on NaN or SIGTERM.

``train(cfg, workdir)``:
- initialises ``jax.distributed`` when ``cfg.distributed`` (TPU VMs: coordinator from the env),
  checks the tokenizer's vocabulary against ``model.vocab_size``, builds the mesh and the step;
- refuses a ``workdir`` holding a run of a different model/data config, writes ``config.json``;
- resumes from the newest restorable checkpoint (state and data-iterator position), else starts
  fresh; metrics lines logged after that checkpoint are dropped so the file matches the state;
- every ``log_every`` steps appends ``{step, loss, lr, grad_norm, step_time, tokens_per_s, mfu,
  model_flops_per_token}`` to ``metrics.jsonl`` and TensorBoard (``loss`` is the CE per token
  before the z-loss; ``step_time`` averages the window, the window holding the first step is marked
  ``compile_included``); evaluates validation CE per token at step 0 and log-spaced steps
  (``{step, val_ce}``); checkpoints every ``checkpoint_every`` steps, at the end, and (with
  ``keep_best``) at each evaluation so the best one can be kept;
- a NaN/Inf loss or gradient norm raises ``NonFiniteLossError`` before any later state is saved;
  SIGTERM checkpoints the current step and raises ``Preempted``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import signal
import statistics
import threading
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rt_jax.data import build_tokenizer, make_iterator
from rt_jax.models.family import get_family
from rt_jax.train.checkpoint import CONFIG_FILE, Checkpointer
from rt_jax.train.config import TrainConfig, load_config, save_config
from rt_jax.train.metrics import (
    MetricsWriter,
    eval_steps,
    model_flops_per_token,
    model_flops_utilisation,
)
from rt_jax.train.sharding import make_mesh
from rt_jax.train.step import TrainStep, build_train_step

log = logging.getLogger(__name__)
PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving that state."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the state was checkpointed and the run stopped (rerun to resume)."""


def maybe_initialize_distributed(cfg: TrainConfig) -> None:
    """``jax.distributed.initialize`` when ``cfg.distributed`` (None fields: from the TPU env)."""
    if not cfg.distributed:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
    )


def check_vocab(cfg: TrainConfig) -> None:
    """ValueError unless the tokenizer's vocabulary equals ``model.vocab_size``."""
    vocab = build_tokenizer(cfg.data).vocab_size
    if vocab != cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} but the {cfg.data.tokenizer!r} tokenizer "
            f"has {vocab} entries: set model.vocab_size={vocab} (and model.embedding_size >= it)"
        )


def check_run_dir(cfg: TrainConfig, workdir: pathlib.Path) -> None:
    """ValueError if ``workdir`` holds a run of a different model or data setup."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    try:
        old = load_config(path)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); use a new workdir") from None
    for section in ("model", "data"):
        a, b = getattr(old, section), getattr(cfg, section)
        if a != b:
            diff = {
                f.name: (getattr(a, f.name), getattr(b, f.name))
                for f in dataclasses.fields(a)
                if getattr(a, f.name) != getattr(b, f.name)
            }
            raise ValueError(
                f"{workdir} holds a run with a different {section} config (saved, requested): "
                f"{diff}; resume with the same settings or use a new workdir"
            )
    if old.steps != cfg.steps:
        log.warning(
            "resuming with steps=%d (was %d): the LR schedule changes", cfg.steps, old.steps
        )


class _SigtermFlag:
    """Records SIGTERM (main thread only) so the loop can checkpoint and exit between steps."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM arrived (in multi-process runs, once JAX's preemption sync says so)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step) or self.raised
            except RuntimeError:
                return self.raised
        return self.raised


def _global_batch(ts: TrainStep, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(ts.batch_sharding[k], np.asarray(v))
        for k, v in local.items()
    }


class _Validation:
    """Validation CE per token over the first ``eval_batches`` batches (0 = the whole split) of
    ``cfg.eval_split`` (logged as ``val_ce`` whichever split it is)."""

    def __init__(self, cfg: TrainConfig, ts: TrainStep):
        self.cfg, self.ts = cfg, ts
        self._cached: list[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Any:
        if self._cached is not None:
            return self._cached
        it = make_iterator(
            self.cfg.data,
            self.cfg.eval_split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_epochs=1,
        )
        if self.cfg.eval_batches == 0:
            return it
        self._cached = [b for _, b in zip(range(self.cfg.eval_batches), it, strict=False)]
        return self._cached

    def __call__(self, params: PyTree) -> dict[str, float]:
        """{"val_ce": ...} plus ``val_ce_<name>`` for each extra ``ce_sum_<name>`` the model
        reports (e.g. LRT's ``val_ce_parallel``)."""
        sums: dict[str, float] = {}
        for local in self._batches():
            out = jax.device_get(self.ts.eval_step(params, _global_batch(self.ts, local)))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        tokens = sums.pop("tokens", 0.0)
        if tokens == 0:
            raise ValueError("the validation split gave no full batch: lower data.batch_size")
        return {
            "val_ce" + key.removeprefix("ce_sum"): value / tokens for key, value in sums.items()
        }


def train(
    cfg: TrainConfig,
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
    init_params: PyTree | None = None,
) -> dict:
    """Train one model in ``workdir`` (resuming if it has checkpoints); see the module docstring.

    ``init_params`` (a pytree shaped like the model's) replaces the random initial parameters of
    a fresh run (fresh optimizer state); a resumed run ignores it.

    Returns {"val_ce", "tokens_per_s", "steps", "history"}; ``val_ce`` is the last evaluation's
    (None when ``eval_points == 0``), ``tokens_per_s`` the median over logged windows. Models that
    report extra validation numbers (LRT: ``val_ce_parallel``) add them under their names.
    """
    workdir = pathlib.Path(workdir)
    maybe_initialize_distributed(cfg)
    check_vocab(cfg)
    get_family(cfg.model).validate(cfg.model, cfg.data.seq_len)
    mesh = make_mesh(cfg.mesh)
    ts = build_train_step(cfg, mesh)
    check_run_dir(cfg, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, workdir / CONFIG_FILE)

    train_iter = make_iterator(
        cfg.data,
        "train",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckpt = Checkpointer(workdir, cfg)
    restored = ckpt.restore_latest(ts.abstract_state, train_iter)
    if restored is None:
        state, start = ts.init(), 0
        if init_params is not None:
            params = jax.device_put(init_params, ts.state_shardings["params"])
            state = {**state, "params": params}
    else:
        state, start = restored
        log.info("resumed from step %d in %s", start, workdir)

    writer = MetricsWriter(workdir, active=is_main, start_step=start)
    validate = _Validation(cfg, ts)
    evals = set(eval_steps(cfg.steps, cfg.eval_points))
    flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
    devices = list(mesh.devices.flat)
    tokens_per_step = cfg.tokens_per_step()
    last_good = start if restored is not None else None
    last_val: float | None = None
    last_extra: dict[str, float] = {}
    for record in writer.history:
        if "val_ce" in record:
            last_val = record["val_ce"]
            last_extra = {k: v for k, v in record.items() if k.startswith("val_ce_")}

    def run_eval(step: int) -> float:
        nonlocal last_extra
        vals = validate(state["params"])
        writer.write({"step": step, **vals})
        if is_main:  # the console's evaluation line (experiments.logs keeps rt_jax INFO there)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        last_extra = {k: v for k, v in vals.items() if k != "val_ce"}
        return vals["val_ce"]

    if start == 0 and 0 in evals and cfg.steps > 0:
        last_val = run_eval(0)

    pending: list[tuple[int, dict]] = []
    window_start = None
    window_steps = 0
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True
    )

    def flush() -> dict | None:
        """Fetch pending metrics, stop on non-finite values; returns the newest step's metrics."""
        nonlocal pending
        if not pending:
            return None
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, fetched, strict=True):
            loss, gnorm = float(m["total_loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                pending = []
                good = "none yet" if last_good is None else f"step {last_good}"
                raise NonFiniteLossError(
                    f"loss={loss}, grad_norm={gnorm} at step {step}: training stopped. The last "
                    f"good checkpoint ({good}) is kept in {ckpt.directory}; lower lr, raise "
                    "warmup, or use compute_dtype=float32, then rerun to resume from it"
                )
        newest = {k: float(v) for k, v in fetched[-1].items()}
        pending = []
        return newest

    try:
        with _SigtermFlag() as sigterm:
            compile_time = None
            for step in range(start, cfg.steps):
                local = next(train_iter)
                batch = _global_batch(ts, local)
                t0 = time.perf_counter()
                state, metrics = ts.step(state, batch)
                done = step + 1
                pending.append((done, metrics))
                if jax.process_count() > 1 or compile_time is None:
                    jax.block_until_ready(metrics)
                if compile_time is None:
                    compile_time = time.perf_counter() - t0
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    window_steps += 1
                bar.update(1)
                stop = sigterm.should_stop(done)
                is_log = done % cfg.log_every == 0 or done == cfg.steps
                is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps or stop
                is_ckpt = is_ckpt or (cfg.keep_best and done in evals)  # a keep-best candidate
                if not (is_log or is_ckpt or done in evals):
                    continue
                newest = flush()
                now = time.perf_counter()
                if is_log and newest is not None:
                    if window_steps:
                        step_time = (now - window_start) / window_steps
                    else:
                        step_time = compile_time
                    tps = tokens_per_step / step_time
                    record = {
                        "step": done,
                        "loss": newest["loss"],
                        "lr": newest["lr"],
                        "grad_norm": newest["grad_norm"],
                        "step_time": step_time,
                        "tokens_per_s": tps,
                        "mfu": model_flops_utilisation(
                            tps, flops_per_token, devices, cfg.model.compute_dtype
                        ),
                        "model_flops_per_token": flops_per_token,
                    }
                    if cfg.z_loss:
                        record["total_loss"] = newest["total_loss"]
                    if window_steps == 0:
                        record["compile_included"] = True
                    writer.write(record)
                    bar.set_postfix(loss=f"{newest['loss']:.3f}", refresh=False)
                val = None
                if done in evals:
                    val = last_val = run_eval(done)
                if is_ckpt:
                    ckpt.save(done, state, train_iter, val_ce=val)
                    last_good = done
                if stop:
                    raise Preempted(
                        f"SIGTERM: saved step {done} to {ckpt.directory}; rerun to resume"
                    )
                window_start, window_steps = time.perf_counter(), 0
    finally:
        bar.close()
        writer.close()
        ckpt.close()

    speeds = [r["tokens_per_s"] for r in writer.history if "tokens_per_s" in r]
    speeds_steady = [
        r["tokens_per_s"]
        for r in writer.history
        if "tokens_per_s" in r and "compile_included" not in r
    ]
    return {
        "val_ce": last_val,
        **last_extra,
        "tokens_per_s": statistics.median(speeds_steady or speeds) if speeds else None,
        "steps": cfg.steps,
        "history": writer.history,
    }

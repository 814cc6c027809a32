"""Orbax checkpoints of the train state and the Grain iterator, resume with fallback, load_model."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding
from orbax.checkpoint import checkpoint_managers as policies

from rt_jax.models.lm import LanguageModel
from rt_jax.train.config import TrainConfig, load_config
from rt_jax.train.optim import make_optimizer
from rt_jax.train.step import init_state

log = logging.getLogger(__name__)
PyTree = Any
ITEMS = ("state", "data")
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def _best_val_ce(metrics: dict) -> float:
    return float(metrics["val_ce"])


class Checkpointer:
    """Composite (train state + data iterator) checkpoints in ``<run_dir>/checkpoints``.

    Keeps the latest ``cfg.keep_checkpoints`` steps plus (``cfg.keep_best``) the step with the
    lowest validation CE. Saves are synchronous: Orbax writes to a temporary directory and renames
    it when complete, and older steps are only removed after that, so the last good checkpoint
    survives a crash mid-save.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: TrainConfig):
        self.run_dir = pathlib.Path(run_dir)
        self.directory = self.run_dir / CHECKPOINT_DIR
        keep: list[Any] = [policies.LatestN(n=cfg.keep_checkpoints)]
        if cfg.keep_best:
            keep.append(
                policies.BestN(
                    get_metric_fn=_best_val_ce,
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=False,
            create=True,
        )
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory.absolute(), item_names=ITEMS, options=self._options
        )

    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: PyTree, data_iter: Any, val_ce: float | None = None) -> None:
        """Save (and commit) ``state`` and the iterator position at ``step``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
        )
        metrics = None if val_ce is None else {"val_ce": float(val_ce)}
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: PyTree, data_iter: Any) -> tuple[PyTree, int] | None:
        """(state, step) from the newest readable checkpoint, restoring ``data_iter`` in place.

        A checkpoint that fails to restore is moved to ``<run_dir>/corrupt_checkpoints`` (with a
        warning) and the previous step is tried. Returns None when there are no checkpoints;
        raises ValueError when none of them can be restored.
        """
        errors = []
        for step in reversed(self.steps()):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            )
            try:
                restored = self.manager.restore(step, args=args)
                state = restored["state"]
                saved_step = int(jax.device_get(state["step"]))
                if saved_step != step:
                    raise ValueError(f"state.step={saved_step} inside the directory of step {step}")
                return state, step
            except Exception as err:  # noqa: BLE001 - any failure means "not restorable"
                errors.append(f"step {step}: {type(err).__name__}: {err}")
                log.warning(
                    "checkpoint at step %d cannot be restored (%s); trying older", step, err
                )
                self._quarantine(step)
        if errors:
            raise ValueError(
                f"no checkpoint in {self.directory} can be restored with this config "
                "(mismatched model/optimizer or corrupt files); use a new workdir or fix the "
                "config. Errors:\n" + "\n".join(e[:500] for e in errors)
            )
        return None

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step out of the manager's directory (process 0 only)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                dst = self.run_dir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.manager.close()
        self.manager = self._open()

    def close(self) -> None:
        """Release the manager."""
        self.manager.close()


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"opt_state/1/0/mu/w_q": (shape, dtype)}``: the metadata's dicts and lists name the same
    leaves as the state's NamedTuples and tuples."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in leaves
    }


def state_mismatches(manager: ocp.CheckpointManager, step: int, abstract: PyTree) -> list[str]:
    """How the saved train state of ``step`` differs from ``abstract`` (leaf paths, shapes, dtypes).

    Read from the checkpoint's metadata before any array is restored, so a config mismatch is an
    error that names the leaves instead of a failed read (Orbax's failed reads also leave asyncio
    tasks whose unretrieved errors are logged later, at garbage collection). Empty when they match
    or when the metadata cannot be read (the restore then reports what is wrong).
    """
    try:
        saved = _leaf_specs(manager.item_metadata(step)["state"].tree)
    except Exception as err:  # noqa: BLE001 - unreadable metadata: let the restore decide
        log.warning("no readable metadata for step %d (%s); restoring without a check", step, err)
        return []
    wanted = _leaf_specs(abstract)
    wanted = dict(sorted(wanted.items(), key=lambda kv: not kv[0].startswith("params/")))
    problems = [f"{k}: not in the checkpoint" for k in wanted if k not in saved]
    problems += [f"{k}: in the checkpoint, not in this config" for k in saved if k not in wanted]
    problems += [
        f"{k}: saved {saved[k][0]} {saved[k][1]}, this config {wanted[k][0]} {wanted[k][1]}"
        for k in wanted
        if k in saved and saved[k] != wanted[k]
    ]
    return problems


def load_model(
    run_dir: str | os.PathLike, step: int | None = None
) -> tuple[LanguageModel, TrainConfig]:
    """The latest (or given) step's model from a run directory, with its training config."""
    run_dir = pathlib.Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise ValueError(f"{run_dir} is not a run directory: {config_path} is missing")
    try:
        cfg = load_config(config_path)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path} is not a valid TrainConfig: {err}") from None
    directory = run_dir / CHECKPOINT_DIR
    if not directory.exists():
        raise ValueError(f"{run_dir} has no checkpoints (expected {directory})")
    manager = ocp.CheckpointManager(
        directory.absolute(),
        item_names=ITEMS,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ValueError(f"{directory} holds no checkpoints")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; saved steps: {steps}")
        device = SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.eval_shape(lambda: init_state(cfg, make_optimizer(cfg)))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
        )
        problems = state_mismatches(manager, step, abstract)
        if problems:
            raise ValueError(
                f"checkpoint at step {step} in {directory} does not match {config_path} (was the "
                f"config edited?): {len(problems)} leaves differ:\n  " + "\n  ".join(problems[:10])
            )
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"checkpoint at step {step} in {directory} does not match {config_path} or is "
                f"corrupt: {type(err).__name__}: {str(err)[:500]}"
            ) from None
    finally:
        manager.close()
    return LanguageModel(cfg.model, params=restored["state"]["params"]), cfg

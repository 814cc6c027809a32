"""Training configuration: frozen dataclasses, presets by name, and ``--set`` style overrides."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from typing import Any

from rt_jax.config import FLAT_FIELDS, ModelConfig, upgrade_flat_fields
from rt_jax.data.config import SPLITS, DataConfig
from rt_jax.train.presets import LRT_EXPERIMENTS, MESH_ABLATIONS

PRESETS = ("tiny", "cpu-demo", "cpu-full", "cpu-lrt", "cpu-mesh", "paper-150m", "paper-300m")
PRESETS += MESH_ABLATIONS  # registered in rt_jax/train/presets/__init__.py
PRESETS += LRT_EXPERIMENTS
ADAM_B2_CHOICES = (0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class ModelPoint:
    """One model of a parameter-matched comparison (the fields ``with_point`` changes)."""

    name: str
    block_type: str
    n_layers: int
    d_model: int
    n_heads: int
    mlp_hidden: int
    family: str = ""
    options: str = ""
    lr: float = 0.0  # > 0: this point's fixed learning rate (no tuning); 0: the preset's / tuned
    steps: int = 0  # > 0: this point's training steps (e.g. matched FLOPs); 0: the preset's
    baselines: str = ""  # comma-separated point names to compare against ("": the default rule)

    @property
    def family_name(self) -> str:
        """The model family this point belongs to (``--models`` selects by it): ``family`` if
        set, else the block type."""
        return self.family or self.block_type


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the axes ("data", "fsdp", "tensor"); one size may be -1 (the rest).

    When no size is -1 and the product is smaller than the device count, the mesh uses the first
    devices only (single-process runs).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if not isinstance(size, int) or (size <= 0 and size != -1):
                raise ValueError(f"mesh.{name}={size!r}: use a positive int, or -1 for the rest")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("only one of mesh.data/fsdp/tensor may be -1")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes on (at most) ``n_devices`` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        fixed = 1
        for s in sizes:
            if s != -1:
                fixed *= s
        if -1 in sizes:
            if n_devices % fixed:
                raise ValueError(
                    f"mesh sizes {sizes}: {n_devices} devices are not divisible by the fixed "
                    f"axes' product {fixed}; change mesh.data/fsdp/tensor"
                )
            sizes[sizes.index(-1)] = n_devices // fixed
        elif fixed > n_devices:
            raise ValueError(
                f"mesh sizes {sizes} need {fixed} devices but only {n_devices} are available; "
                "set one of mesh.data/fsdp/tensor to -1 or make the product smaller"
            )
        return sizes[0], sizes[1], sizes[2]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the defaults are the reference recipe.

    Learning rate: linear warmup from ``warmup_start_fraction * lr`` to ``lr`` over
    ``warmup_fraction * steps`` steps, then cosine decay to ``final_lr_fraction * lr`` at ``steps``.
    AdamW (``b1``, ``b2``, ``eps``, ``weight_decay``) after global-norm clipping at ``grad_clip``.
    ``batch_size``/``seq_len`` live in ``data`` (global sequences per step). ``microbatches`` splits
    each step's batch for gradient accumulation. Parameters are float32; ``model.compute_dtype``
    sets the matmul dtype. Evaluation runs at step 0 and at ``eval_points`` log-spaced steps up to
    the last one, over ``eval_batches`` validation batches (0 = the whole split).
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    steps: int = 100
    lr: float = 1e-3
    warmup_fraction: float = 0.4
    warmup_start_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    z_loss: float = 0.0
    microbatches: int = 1
    mesh: MeshConfig = MeshConfig()
    seed: int = 0
    log_every: int = 10
    eval_points: int = 10
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    keep_best: bool = True
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    compare: tuple[ModelPoint, ...] = ()
    seeds: tuple[int, ...] = (0,)
    # experiments.param_matched: the split the loop evaluates on, and the learning-rate tuning of
    # every compare point (log-spaced grid, () = three values around ``lr``; 0 steps = steps // 3).
    eval_split: str = "validation"
    tune_lrs: tuple[float, ...] = ()
    tune_steps: int = 0

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        positive_ints = ("steps", "microbatches", "log_every", "checkpoint_every")
        for name in positive_ints + ("keep_checkpoints",):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a positive int")
        for name in ("eval_points", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be > 0")
        for name in ("warmup_fraction", "warmup_start_fraction", "final_lr_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TrainConfig.{name}={value!r} must lie in [0, 1]")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must lie in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.z_loss < 0:
            raise ValueError(
                "TrainConfig: eps and grad_clip must be > 0, weight_decay and z_loss >= 0 "
                f"(got eps={self.eps}, grad_clip={self.grad_clip}, "
                f"weight_decay={self.weight_decay}, z_loss={self.z_loss})"
            )
        if self.data.batch_size % self.microbatches:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"microbatches={self.microbatches}: change one of them"
            )
        if self.model.compute_dtype == "float64":
            raise ValueError("model.compute_dtype=float64 is for tests only; use float32/bfloat16")
        if not self.seeds:
            raise ValueError("TrainConfig.seeds must name at least one seed")
        for point in self.compare:
            if not isinstance(point, ModelPoint):
                raise ValueError(f"TrainConfig.compare holds ModelPoint entries, got {point!r}")
            if not point.lr >= 0 or not isinstance(point.steps, int) or point.steps < 0:
                raise ValueError(
                    f"ModelPoint {point.name!r}: lr={point.lr!r} and steps={point.steps!r} must "
                    "be >= 0 (0: the preset's)"
                )
        if self.eval_split not in SPLITS:
            raise ValueError(
                f"TrainConfig.eval_split={self.eval_split!r}: expected one of {SPLITS}"
            )
        if any(not lr > 0 for lr in self.tune_lrs):
            raise ValueError(f"TrainConfig.tune_lrs={self.tune_lrs!r}: every lr must be > 0")
        if not isinstance(self.tune_steps, int) or self.tune_steps < 0:
            raise ValueError(f"TrainConfig.tune_steps={self.tune_steps!r} must be an int >= 0")

    def micro_batch_size(self) -> int:
        """Global sequences per microbatch."""
        return self.data.batch_size // self.microbatches

    def tokens_per_step(self) -> int:
        """Global tokens trained on per optimizer step."""
        return self.data.batch_size * self.data.seq_len


def _derived_model_fields(old: ModelConfig) -> dict[str, Any]:
    """Fields of ``old`` that were filled from another field (so they follow it when it changes)."""
    derived = {}
    if old.n_kv_heads == old.n_heads:
        derived["n_kv_heads"] = None
    if old.mlp_hidden == 4 * old.d_model:
        derived["mlp_hidden"] = None
    if old.embedding_size == old.vocab_size:
        derived["embedding_size"] = None
    return derived


def replace_model(model: ModelConfig, **changes: Any) -> ModelConfig:
    """``dataclasses.replace`` where n_kv_heads/mlp_hidden/embedding_size that were derived from
    n_heads/d_model/vocab_size are re-derived, unless set explicitly in ``changes``."""
    fields = {**_derived_model_fields(model), **changes}
    return dataclasses.replace(model, **fields)


def point_model(model: ModelConfig, point: ModelPoint) -> ModelConfig:
    """``model`` with the block type, shape and ``options`` of ``point`` (MHA; vocab, impl,
    dtype kept). ``options`` are comma-separated ModelConfig ``field=value`` pairs (sections
    dotted), e.g. ``"memory.kind=shared,memory.passes=2"`` or
    ``"loop.layout=1+2R2+1,loop.handoff=mesh"``. Options saved before the sections existed
    (``"memory=shared"``, ``"loop=1+2R2+1,handoff=mesh"``) are read in the new spelling."""
    changes: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in point.options.split(","))):
        if "=" not in item:
            raise ValueError(f"ModelPoint {point.name!r}: option {item!r} is not field=value")
        key, text = (t.strip() for t in item.split("=", 1))
        key = FLAT_FIELDS.get(key, key)
        _parse_path(model, key.split("."), text, f"{point.name}: {item}", changes)
    changes = {
        name: _rebuild(getattr(model, name), value, f"{name}.")
        if isinstance(value, dict)
        else value
        for name, value in changes.items()
    }
    return replace_model(
        model,
        block_type=point.block_type,
        n_layers=point.n_layers,
        d_model=point.d_model,
        n_heads=point.n_heads,
        n_kv_heads=None,
        mlp_hidden=point.mlp_hidden,
        **changes,
    )


def with_point(cfg: TrainConfig, point: ModelPoint, seed: int) -> TrainConfig:
    """The single-model config of one comparison cell (model shape from ``point``, init ``seed``;
    the point's own ``lr`` and ``steps`` when set).

    The data order (``data.shuffle_seed``) is left unchanged, so every cell sees the same tokens.
    """
    model = point_model(cfg.model, point)
    fixed = {"lr": point.lr} if point.lr else {}
    if point.steps:
        fixed["steps"] = point.steps
    return dataclasses.replace(cfg, model=model, seed=seed, compare=(), seeds=(seed,), **fixed)


def get_preset(name: str) -> TrainConfig:
    """The named preset: one of ``PRESETS``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    module = importlib.import_module(f"rt_jax.train.presets.{name.replace('-', '_')}")
    return module.config()


# --------------------------------------------------------------------------------------------
# Overrides: "a.b=value" with values parsed by the field's type.


def _parse_scalar(text: str, typ: Any, where: str) -> Any:
    if typ is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a bool (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: expected an int, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: expected a float, got {text!r}") from None
    if typ is str:
        return text
    raise ValueError(f"{where}: fields of type {typ} cannot be set from the command line")


def _parse_value(text: str, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("none", "null"):
            return None
        if len(args) == 1:
            return _parse_value(text, args[0], where)
        raise ValueError(f"{where}: cannot parse a value of type {typ}")
    if origin is tuple:
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:
            parts = [p for p in text.split(",") if p.strip()]
            return tuple(_parse_value(p.strip(), args[0], where) for p in parts)
        raise ValueError(f"{where}: cannot parse a value of type {typ}")
    return _parse_scalar(text, typ, where)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_path(obj: Any, path: list[str], text: str, full: str, changes: dict) -> None:
    """Check ``path`` against the dataclass fields and record the parsed value in ``changes``."""
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not inside a config section")
    hints = _field_types(type(obj))
    name = path[0]
    if isinstance(obj, ModelConfig) and name in FLAT_FIELDS and len(path) == 1:
        raise ValueError(
            f"--set {full}: ModelConfig.{name} moved into a section: write "
            f"{FLAT_FIELDS[name]}=... (e.g. model.{FLAT_FIELDS[name]}=...)"
        )
    if name not in hints or name not in {f.name for f in dataclasses.fields(obj)}:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ValueError(
            f"--set {full}: unknown field {name!r} in {type(obj).__name__} (fields: {known})"
        )
    if len(path) > 1:
        sub = changes.setdefault(name, {})
        if not isinstance(sub, dict):
            raise ValueError(f"--set {full}: {name} is not a config section")
        _parse_path(getattr(obj, name), path[1:], text, full, sub)
        return
    if dataclasses.is_dataclass(hints[name]):
        raise ValueError(f"--set {full}: {name} is a section; set one of its fields")
    changes[name] = _parse_value(text, hints[name], f"--set {full} ({type(obj).__name__}.{name})")


def _rebuild(obj: Any, changes: dict, where: str) -> Any:
    """``obj`` with ``changes`` (nested dicts for sections) applied at once, then validated."""
    fields = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            value = _rebuild(getattr(obj, name), value, f"{where}{name}.")
        fields[name] = value
    try:
        if isinstance(obj, ModelConfig):
            return replace_model(obj, **fields)
        return dataclasses.replace(obj, **fields)
    except ValueError as err:
        shown = ", ".join(f"{where}{k}" for k in changes)
        raise ValueError(f"--set {shown}: {err}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``"field=value"`` / ``"section.field=value"`` overrides (later ones win).

    Values are parsed by the field's type (bools: true/false; optional fields: none;
    tuples: comma-separated). All overrides of a section are applied together before it is
    validated, so their order does not matter. Derived model fields (n_kv_heads, mlp_hidden,
    embedding_size) follow their sources unless set explicitly. Unknown fields and bad values raise
    ValueError naming the field.
    """
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected field=value, e.g. steps=100")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        if not all(path):
            raise ValueError(f"--set {item!r}: empty field name in {key!r}")
        _parse_path(cfg, path, text.strip(), item, changes)
    return _rebuild(cfg, changes, "") if changes else cfg


# --------------------------------------------------------------------------------------------
# JSON round trip (config.json in a run directory).


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A JSON-serialisable dict of the config."""
    return dataclasses.asdict(cfg)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    if cls is ModelConfig:
        data = upgrade_flat_fields(data)
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, typ = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = _from_dict(typ, value)
        elif typing.get_origin(typ) is tuple and isinstance(value, (list, tuple)):
            (inner, *_rest) = typing.get_args(typ)
            if dataclasses.is_dataclass(inner):
                value = tuple(_from_dict(inner, v) for v in value)
            else:
                value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of ``config_to_dict`` (unknown keys are ignored, missing ones take defaults).

    Model configs saved before the family sections (flat ``memory="shared"``, ``memory_layer``,
    ``loop="1+2R2+1"``, ``handoff``, ``mesh_slots``) are converted by
    ``rt_jax.config.upgrade_flat_fields``; ``ModelPoint`` options in the old spelling are read by
    ``point_model``."""
    return _from_dict(TrainConfig, data)


def save_config(cfg: TrainConfig, path: Any) -> None:
    """Write the config as indented JSON (atomically: other processes may be reading it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_config(path: Any) -> TrainConfig:
    """Read a config written by ``save_config``."""
    with open(path) as f:
        return config_from_dict(json.load(f))

"""Loop-dynamics probe of recursive models (MeSH paper Sec. 2 / Figs. 1, 3-5, our own scale).

    python -m experiments.mesh_probe --preset cpu-mesh [--runs-dir runs] [--batches 8]
    python -m experiments.mesh_probe --preset cpu-mesh --train-steps 200   # trains its own models

Loads every recursive point of the preset (``recursive-base``, ``-residual``, ``-anchor``,
``-anchor-emb``, ``mesh``; whichever exist) from the runs of ``experiments.param_matched``
(``<runs-dir>/param_matched_<preset>/<point>_s<seed>/``) or, with ``--train-steps N``, trains
them itself for N steps in ``<runs-dir>/mesh_probe_<preset>/``. On ``--batches`` validation
batches it measures, per core iteration t (h^(t) the loop state, f the shared core):

* ``cosine``: cos(h^(t), h^(t+1)), the mean over tokens (the "undifferentiated computation"
  pathology is consecutive states that barely change direction);
* ``relative_update``: 2 ||f(h^(t)) - h^(t)||_F / (||f(h^(t))||_F + ||h^(t)||_F), Frobenius over
  each sequence's N x D states, mean over sequences (the paper's per-block effort measure);
* for MeSH, ``write`` / ``read``: the routers' mean weight per slot, per pair (row 0 = the
  transitional pair on the prelude output, row t+1 = loop step t).

Writes ``results/mesh_probe.json`` (per variant: mean over seeds, plus each seed) and
``results/mesh_probe.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.param_matched import _write_outputs, run_dir
from experiments.provenance import git_commit, machine
from rt_jax.config import ModelConfig
from rt_jax.train.config import PRESETS, TrainConfig, get_preset, with_point


def probe_model(params: Any, config: ModelConfig, batches: Sequence[np.ndarray]) -> dict:
    """Per-iteration cosine similarity, relative update and (MeSH) mean slot weights.

    ``batches`` are (B, N+1) token arrays (the validation batches' ``tokens``; the last column
    is dropped). Returns lists: ``cosine`` and ``relative_update`` (Nloop), and for MeSH
    ``write`` and ``read`` (Nloop+1 pairs x S slots).
    """
    import jax
    import jax.numpy as jnp

    from rt_jax.models import recursive

    if config.family != "recursive":
        raise ValueError(
            f"the probe needs a recursive model (config.loop.layout set), got {config.loop!r}"
        )
    lay = recursive.layout(config)
    core = jax.tree.map(lambda a: a[lay.prelude : lay.prelude + lay.core], params["blocks"])
    segment = recursive.forward_segment(config)

    @jax.jit
    def stats(params: Any, tokens: jax.Array) -> dict:
        _, trace = recursive.forward_hidden(params, tokens, config, trace=True)
        h, h_next, f_h = trace.states[:-1], trace.states[1:], trace.core_outputs
        # f(h^(t)) is the core output itself; recompute it only to check the trace agrees.
        f_check = segment(h[0], core, None)[0]
        unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-30)  # noqa: E731
        cosine = jnp.mean(jnp.sum(unit(h) * unit(h_next), axis=-1), axis=(1, 2))
        fro = lambda a: jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))  # noqa: E731
        rel = 2 * fro(f_h - h) / (fro(f_h) + fro(h))
        out = {
            "cosine": cosine,
            "relative_update": jnp.mean(rel, axis=1),
            "trace_error": jnp.max(jnp.abs(f_check - f_h[0])),
        }
        if config.loop.handoff == "mesh":
            out["write"] = jnp.mean(trace.write, axis=(1, 2))
            out["read"] = jnp.mean(trace.read, axis=(1, 2))
        return out

    sums: dict[str, np.ndarray] = {}
    for batch in batches:
        tokens = jnp.asarray(np.asarray(batch)[:, :-1])
        for key, value in jax.device_get(stats(params, tokens)).items():
            if key == "trace_error":
                if value > 1e-3:
                    raise AssertionError(f"loop trace disagrees with the core: {value}")
                continue
            sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
    if not sums:
        raise ValueError("the probe needs at least one batch")
    return {key: (value / len(batches)).tolist() for key, value in sums.items()}


def _mean_over_seeds(runs: list[dict]) -> dict:
    return {
        key: np.mean([np.asarray(r[key]) for r in runs], axis=0).tolist()
        for key in runs[0]
        if key != "seed"
    }


def plot(variants: dict[str, dict], path: Path) -> None:
    """Cosine similarity and relative update per iteration, MeSH slot usage (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_cos, ax_rel), (ax_write, ax_read) = axes
    for name, v in variants.items():
        steps = np.arange(1, len(v["cosine"]) + 1)
        ax_cos.plot(steps, v["cosine"], marker="o", label=name)
        ax_rel.plot(steps, v["relative_update"], marker="o", label=name)
    ax_cos.set(
        xlabel="core iteration t (h^(t-1) -> h^(t))",
        ylabel="mean cosine(h^(t-1), h^(t))",
        title="consecutive loop states (higher = less change)",
    )
    ax_rel.set(
        xlabel="core iteration t",
        ylabel="2|f(h)-h| / (|f(h)|+|h|)",
        title="relative update of the core per iteration",
    )
    for ax in (ax_cos, ax_rel):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    mesh = next((v for v in variants.values() if "write" in v), None)
    for ax, key in ((ax_write, "write"), (ax_read, "read")):
        if mesh is None:
            ax.set_axis_off()
            ax.set_title(f"no MeSH model: no {key} weights")
            continue
        weights = np.asarray(mesh[key])
        im = ax.imshow(weights, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(weights):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set(
            xlabel="slot (0 = embeddings)",
            ylabel="pair (0 = transitional, t+1 = step t)",
            title=f"MeSH mean {key} weight per slot",
            xticks=range(weights.shape[1]),
            yticks=range(weights.shape[0]),
        )
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_outputs(results: dict[str, list[dict]], out_dir: Path, meta: dict) -> dict:
    """Write ``mesh_probe.json`` and ``mesh_probe.png``; ``results``: variant -> per-seed dicts."""
    variants = {name: _mean_over_seeds(runs) for name, runs in results.items() if runs}
    payload = {**meta, "variants": variants, "per_seed": results}
    _write_outputs(
        Path(out_dir),
        "mesh_probe",
        {".json": json.dumps(payload, indent=1) + "\n", ".png": lambda tmp: plot(variants, tmp)},
    )
    return payload


def _validation_batches(cfg: TrainConfig, n: int) -> list[np.ndarray]:
    from rt_jax.data.pipeline import make_iterator

    it = make_iterator(cfg.data, "validation", num_epochs=1)
    batches = [b["tokens"] for _, b in zip(range(n), it, strict=False)]
    if not batches:
        raise ValueError("the validation split gave no batch: lower data.batch_size")
    return batches


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-mesh", choices=PRESETS)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--batches", type=int, default=8, help="validation batches to probe")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: preset's")
    parser.add_argument(
        "--train-steps", type=int, default=0, help="train the models here for N steps first"
    )
    args = parser.parse_args(argv)
    if args.batches < 1 or args.train_steps < 0:
        parser.error("--batches must be >= 1 and --train-steps >= 0")

    from rt_jax.train.checkpoint import load_model

    cfg = get_preset(args.preset)
    seeds = cfg.seeds if args.seeds is None else tuple(args.seeds)
    points = [p for p in cfg.compare if with_point(cfg, p, seeds[0]).model.family == "recursive"]
    if not points:
        raise SystemExit(f"preset {args.preset} has no recursive points to probe")
    batches = _validation_batches(cfg, args.batches)
    results: dict[str, list[dict]] = {}
    for point in points:
        for seed in seeds:
            if args.train_steps:
                from rt_jax.train.loop import train

                workdir = (
                    Path(args.runs_dir) / f"mesh_probe_{args.preset}" / f"{point.name}_s{seed}"
                )
                cell = dataclasses.replace(
                    with_point(cfg, point, seed),
                    steps=args.train_steps,
                    eval_points=0,
                    checkpoint_every=args.train_steps,
                )
                train(cell, workdir, progress=False)
            else:
                workdir = run_dir(args.runs_dir, args.preset, point.name, seed)
                if not workdir.exists():
                    print(f"skip {point.name} seed {seed}: no run at {workdir}", file=sys.stderr)
                    continue
            model, run_cfg = load_model(workdir)
            row = probe_model(model.params(), run_cfg.model, batches)
            results.setdefault(point.name, []).append({"seed": seed, **row})
    if not results:
        raise SystemExit(
            f"no runs found under {args.runs_dir}/param_matched_{args.preset}/: run "
            f"`python -m experiments.param_matched --preset {args.preset}` or pass --train-steps"
        )
    meta = {
        "command": "python -m experiments.mesh_probe " + shlex.join(argv or sys.argv[1:]),
        "commit": git_commit(),
        "machine": machine(),
        "preset": args.preset,
        "batches": args.batches,
        "train_steps": args.train_steps or None,
    }
    payload = write_outputs(results, Path(args.out_dir), meta)
    print("| model | cos(h^t, h^t+1) per step | relative update per step |")
    print("|---|---|---|")
    for name, v in payload["variants"].items():
        cos = ", ".join(f"{c:.3f}" for c in v["cosine"])
        rel = ", ".join(f"{r:.3f}" for r in v["relative_update"])
        print(f"| {name} | {cos} | {rel} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

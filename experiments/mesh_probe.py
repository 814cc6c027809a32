"""Loop-dynamics probe of recursive models: what the MeSH paper measures (Figs. 1, 3-5), at our scale.

    python -m experiments.mesh_probe --preset cpu-mesh --train-steps 150 --points recursive-base mesh
    python -m experiments.mesh_probe --preset cpu-mesh            # from param_matched's run dirs

Takes the recursive points of a preset (``--points`` selects by name), either from the runs of
``experiments.param_matched`` (``<runs-dir>/param_matched_<preset>/<point>_s<seed>/``) or, with
``--train-steps N``, trains them here for N steps (``<runs-dir>/mesh_probe_<preset>/``). Every
statistic is measured on the trained model **and on the same model at its initialisation** (same
seed: the run's exact initial parameters), so a number an untrained model already shows is
visible as such. On ``--batches``
validation batches (B x N tokens each), with h^(t) the loop state entering core iteration t
(h^(0) after the prelude / transitional read, h^(Nloop) into the coda):

* ``relative_update`` per **unrolled block** l (prelude, every core layer of every iteration,
  coda): 2 ||f_l(x) - x||_F / (||f_l(x)||_F + ||x||_F), x the block input, Frobenius over each
  sequence's N x D states, mean over sequences (the paper's Fig. 3 effort measure);
* ``cka``: linear CKA between loop states h^(i), h^(j) (tokens as samples, D features, centred):
  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), per batch, mean over batches (Fig. 4; the paper uses
  an RBF kernel; linear CKA is its common stand-in);
* ``spectrum``: singular values of each centred loop state (B*N x D), divided by the largest,
  top ``min(50, D)``, mean over batches (Fig. 5); ``effective_rank``: exp of the entropy of the
  normalised singular values;
* ``state_norm``: mean per-token L2 norm of each loop state, and of every block's output
  (``block_norm``);
* MeSH only: ``write_mass`` / ``read_mass``, the mean router weight per slot per pair (row 0 the
  transitional pair), and ``write_entropy`` / ``read_entropy``, the mean per-token entropy of each
  pair's weights in nats (uniform = ln S, one-hot = 0).

Writes ``results/mesh_probe.{json,png,md}`` with the command, commit and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.provenance import git_commit, machine
from rt_jax.config import ModelConfig
from rt_jax.train.config import PRESETS, TrainConfig, get_preset, with_point

TOP_SINGULAR = 50


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (samples, features) matrices (centred here)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y) + 1e-300))


def _spectrum(x: np.ndarray) -> np.ndarray:
    """Singular values of the centred (samples, features) matrix over the largest one."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    return s / (s[0] + 1e-300)


def _effective_rank(spectrum: np.ndarray) -> float:
    p = spectrum / spectrum.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _entropy(w: np.ndarray) -> np.ndarray:
    """Mean per-token entropy (nats) of router weights (pairs, ..., S) -> (pairs,)."""
    h = -(w * np.log(np.clip(w, 1e-30, None))).sum(-1)
    return h.reshape(h.shape[0], -1).mean(1)


def probe_model(params: Any, config: ModelConfig, batches: Sequence[np.ndarray]) -> dict:
    """The probe's statistics of one model on ``batches`` ((B, N+1) token arrays; the last column
    is dropped), as lists (see the module docstring for each key)."""
    import jax
    import jax.numpy as jnp

    from rt_jax.models import recursive

    if config.family != "recursive":
        raise ValueError(
            f"the probe needs a recursive model (config.loop.layout set), got {config.loop!r}"
        )
    fn, spec = recursive._layer_fn(config), config.attention_spec()

    def run(h: jax.Array, blocks: Any, xs: Any) -> tuple[jax.Array, tuple]:
        del xs

        def body(x: jax.Array, layer: Any) -> tuple[jax.Array, tuple]:
            z = fn(layer, x, spec)
            return z, (x, z)

        return jax.lax.scan(body, h, blocks)

    @jax.jit
    def states(params: Any, tokens: jax.Array) -> dict:
        x = recursive.embed_inputs(params, tokens, config)
        _, (block_in, block_out), trace = recursive.recursive_hidden(
            params, x, config, run, trace=True
        )
        fro = lambda a: jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))  # noqa: E731
        rel = 2 * fro(block_out - block_in) / (fro(block_out) + fro(block_in))  # depth x B
        out = {
            "relative_update": jnp.mean(rel, axis=1),
            "block_norm": jnp.mean(jnp.linalg.norm(block_out, axis=-1), axis=(1, 2)),
            "state_norm": jnp.mean(jnp.linalg.norm(trace.states, axis=-1), axis=(1, 2)),
            "states": trace.states,
        }
        if trace.write is not None:
            out["write"], out["read"] = trace.write, trace.read
        return out

    sums: dict[str, np.ndarray] = {}

    def add(key: str, value: Any) -> None:
        sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)

    for batch in batches:
        got = jax.device_get(states(params, jnp.asarray(np.asarray(batch)[:, :-1])))
        for key in ("relative_update", "block_norm", "state_norm"):
            add(key, got[key])
        flat = np.asarray(got["states"], np.float64).reshape(len(got["states"]), -1, config.d_model)
        n = len(flat)
        add("cka", [[_linear_cka(flat[i], flat[j]) for j in range(n)] for i in range(n)])
        spectra = np.stack([_spectrum(s) for s in flat])
        add("spectrum", spectra[:, :TOP_SINGULAR])
        add("effective_rank", [_effective_rank(s) for s in spectra])
        if "write" in got:
            for name in ("write", "read"):
                w = np.asarray(got[name], np.float64)  # pairs x B x N x S
                add(f"{name}_mass", w.reshape(w.shape[0], -1, w.shape[-1]).mean(1))
                add(f"{name}_entropy", _entropy(w))
    if not sums:
        raise ValueError("the probe needs at least one batch")
    out = {key: (value / len(batches)).tolist() for key, value in sums.items()}
    if config.loop.handoff == "mesh":
        out["max_entropy"] = float(np.log(config.loop.n_slots))
    out["unrolled_layers"] = list(config.loop.parsed().unrolled_layers())
    return out


def _mean_over_seeds(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        if key == "seed":
            continue
        values = [r[key] for r in runs]
        out[key] = values[0] if key == "unrolled_layers" else np.mean(values, axis=0).tolist()
    return out


def plot(variants: dict[str, dict[str, dict]], path: Path) -> None:
    """Six panels: per-block relative update, state norms, effective rank, spectra, CKA of
    consecutive states, MeSH read entropy; trained solid, untrained dashed (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, pair) in enumerate(variants.items()):
        c = colors[i % len(colors)]
        for state, style in (("trained", "-"), ("untrained", "--")):
            v = pair[state]
            label = f"{name} ({state})"
            axes[0, 0].plot(v["relative_update"], style, color=c, marker=".", label=label)
            axes[0, 1].plot(v["state_norm"], style, color=c, marker="o", label=label)
            axes[0, 2].plot(v["effective_rank"], style, color=c, marker="o", label=label)
            spec = np.asarray(v["spectrum"])
            axes[1, 0].semilogy(spec[-1], style, color=c, label=f"{label}, h^(T)")
            cka = np.asarray(v["cka"])
            axes[1, 1].plot(np.diag(cka, 1), style, color=c, marker="o", label=label)
            if "read_entropy" in v:
                axes[1, 2].plot(
                    v["read_entropy"], style, color=c, marker="o", label=f"{label} read"
                )
                axes[1, 2].plot(
                    v["write_entropy"], ":", color=c, marker="x", label=f"{label} write"
                )
                axes[1, 2].axhline(v["max_entropy"], color="grey", lw=0.8)
    titles = [
        ("unrolled block", "2|f(x)-x|/(|f(x)|+|x|)", "relative update per block"),
        ("loop state t", "mean token norm", "loop-state norms h^(t)"),
        ("loop state t", "exp(entropy of sigma)", "effective rank of h^(t)"),
        ("singular value index", "sigma_i / sigma_1", "spectrum of the last loop state"),
        ("t", "linear CKA(h^(t), h^(t+1))", "similarity of consecutive loop states"),
        ("router pair (0 = transitional)", "nats (grey: ln S)", "MeSH per-token router entropy"),
    ]
    for ax, (xl, yl, title) in zip(axes.flat, titles, strict=True):
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _fmt(values: Any) -> str:
    return ", ".join(f"{v:.3f}" for v in np.ravel(values))


def _trained_how(train_steps: int | None) -> str:
    """How the probed models were trained: retrained here, or read from the preset's runs."""
    if train_steps:
        return f"models retrained here for {train_steps} steps"
    return "models read from the preset's finished runs (`experiments.param_matched`, its steps)"


def markdown(payload: dict) -> str:
    """The results table: every statistic, trained beside untrained, per variant."""
    lines = [
        "# MeSH loop-dynamics probe",
        "",
        f"Command: `{payload['command']}`  ",
        f"Commit: `{payload['commit']}`; machine: {payload['machine']}  ",
        f"Preset `{payload['preset']}`, {payload['batches']} validation batches, "
        f"{_trained_how(payload['train_steps'])}, seeds {payload['seeds']}. Plot: `mesh_probe.png`; "
        "definitions: `experiments/mesh_probe.py`.",
        "",
        "| variant | model | relative update per unrolled block | loop-state norms | "
        "CKA(h^t, h^t+1) | effective rank of h^t | sigma_10/sigma_1 of h^T |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pair in payload["variants"].items():
        for state in ("trained", "untrained"):
            v = pair[state]
            spec = np.asarray(v["spectrum"])[-1]
            lines.append(
                f"| {name} | {state} | {_fmt(v['relative_update'])} | {_fmt(v['state_norm'])} | "
                f"{_fmt(np.diag(np.asarray(v['cka']), 1))} | {_fmt(v['effective_rank'])} | "
                f"{spec[min(9, len(spec) - 1)]:.3f} |"
            )
    mesh = [(n, p) for n, p in payload["variants"].items() if "read_mass" in p["trained"]]
    if mesh:
        lines += [
            "",
            "MeSH routers: per-token entropy (nats; uniform = ln S) and mean mass per slot, per "
            "pair (row 0 = the transitional pair, then loop steps).",
            "",
            "| variant | model | pair | write entropy | read entropy | write mass per slot | "
            "read mass per slot |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, pair in mesh:
            for state in ("trained", "untrained"):
                v = pair[state]
                for t in range(len(v["read_mass"])):
                    lines.append(
                        f"| {name} | {state} | {t} | {v['write_entropy'][t]:.3f} | "
                        f"{v['read_entropy'][t]:.3f} (ln S = {v['max_entropy']:.3f}) | "
                        f"{_fmt(v['write_mass'][t])} | {_fmt(v['read_mass'][t])} |"
                    )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, dict[str, list[dict]]], out_dir: Path, meta: dict) -> dict:
    """Write ``mesh_probe.{json,png,md}``; ``results``: variant -> {"trained", "untrained"} ->
    per-seed dicts. Files are written to temporary names, then renamed."""
    variants = {
        name: {state: _mean_over_seeds(runs) for state, runs in pair.items()}
        for name, pair in results.items()
    }
    payload = {**meta, "variants": variants, "per_seed": results}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    for suffix in (".json", ".md", ".png"):
        tmp, final = out_dir / f".mesh_probe{suffix}.tmp", out_dir / f"mesh_probe{suffix}"
        if suffix == ".json":
            tmp.write_text(json.dumps(payload, indent=1) + "\n")
        elif suffix == ".md":
            tmp.write_text(markdown(payload))
        else:
            plot(variants, tmp)
        staged.append((tmp, final))
    for tmp, final in staged:
        os.replace(tmp, final)
    return payload


def _validation_batches(cfg: TrainConfig, n: int) -> list[np.ndarray]:
    from rt_jax.data.pipeline import make_iterator

    it = make_iterator(cfg.data, "validation", num_epochs=1)
    batches = [b["tokens"] for _, b in zip(range(n), it, strict=False)]
    if not batches:
        raise ValueError("the validation split gave no batch: lower data.batch_size")
    return batches


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-mesh", choices=PRESETS)
    parser.add_argument("--points", nargs="*", default=None, help="default: every recursive one")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to probe")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: preset's")
    parser.add_argument(
        "--train-steps", type=int, default=0, help="train the models here for N steps first"
    )
    args = parser.parse_args(argv)
    if args.batches < 1 or args.train_steps < 0:
        parser.error("--batches must be >= 1 and --train-steps >= 0")

    from rt_jax.models import lm
    from rt_jax.train.checkpoint import load_model

    cfg = get_preset(args.preset)
    seeds = cfg.seeds if args.seeds is None else tuple(args.seeds)
    points = [p for p in cfg.compare if with_point(cfg, p, seeds[0]).model.family == "recursive"]
    if args.points is not None:
        unknown = set(args.points) - {p.name for p in points}
        if unknown:
            parser.error(f"--points {sorted(unknown)}: not recursive points of {args.preset}")
        points = [p for p in points if p.name in args.points]
    if not points:
        raise SystemExit(f"preset {args.preset} has no recursive points to probe")
    batches = _validation_batches(cfg, args.batches)
    results: dict[str, dict[str, list[dict]]] = {}
    import jax

    for point in points:
        for seed in seeds:
            cell = with_point(cfg, point, seed)
            if args.train_steps:
                from rt_jax.train.loop import train

                workdir = (
                    Path(args.runs_dir) / f"mesh_probe_{args.preset}" / f"{point.name}_s{seed}"
                )
                cell = dataclasses.replace(
                    cell, steps=args.train_steps, eval_points=0, checkpoint_every=args.train_steps
                )
                train(cell, workdir, progress=False)
            else:
                workdir = (
                    Path(args.runs_dir) / f"param_matched_{args.preset}" / f"{point.name}_s{seed}"
                )
                if not workdir.exists():
                    print(f"skip {point.name} seed {seed}: no run at {workdir}", file=sys.stderr)
                    continue
            model, run_cfg = load_model(workdir)
            # The run's own initial parameters (rt_jax.train.step.init_state's key split).
            k_params = jax.random.split(jax.random.key(run_cfg.seed))[0]
            init = lm.init_params(run_cfg.model, k_params)
            pair = results.setdefault(point.name, {"trained": [], "untrained": []})
            pair["trained"].append(
                {"seed": seed, **probe_model(model.params(), run_cfg.model, batches)}
            )
            pair["untrained"].append({"seed": seed, **probe_model(init, run_cfg.model, batches)})
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
        "seeds": list(seeds),
    }
    payload = write_outputs(results, Path(args.out_dir), meta)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

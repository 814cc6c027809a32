"""Train one model from a preset.

    python -m experiments.train --preset <name> --workdir <dir> [--set field=value ...]

Resumes automatically from ``<dir>``; appends JSON lines to ``<dir>/metrics.jsonl`` (train lines
with step, loss, lr, grad_norm, step_time, tokens_per_s, mfu; eval lines with step, val_ce) and
TensorBoard events to ``<dir>/tb``. The console shows the progress bar, evaluations and warnings;
``<dir>/log.txt`` also gets the libraries' INFO log (``--verbose`` prints it too). Example (about a
minute on 2 CPU cores):

    JAX_PLATFORMS=cpu python -m experiments.train --preset tiny --workdir /tmp/rt_tiny --set steps=200

``--init-from PATH`` starts a fresh run from the weights of a run directory or a reference-format
checkpoint (``rt_jax.train.init_from``; a Transformer checkpoint can start an RT) and records the
source in ``<dir>/init_from.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments.logs import LOG_FILE, log_to_file, setup_logging
from rt_jax.train.config import PRESETS, apply_overrides, get_preset
from rt_jax.train.init_from import load_init_params
from rt_jax.train.loop import NonFiniteLossError, Preempted, train


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, print a one-line JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. steps=100, model.d_model=64, mesh.data=2",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument(
        "--init-from",
        metavar="PATH",
        help="start from these weights: a run directory or a reference-format checkpoint",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"libraries' INFO on the console too (always in {LOG_FILE})",
    )
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
    except ValueError as err:
        parser.error(str(err))
    try:
        init = None
        if args.init_from:
            init, record = load_init_params(args.init_from, cfg.model)
            workdir = pathlib.Path(args.workdir)
            if not (workdir / "checkpoints").exists():  # a fresh run (a resumed one ignores it)
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "init_from.json").write_text(json.dumps(record) + "\n")
        with log_to_file(args.workdir):
            result = train(cfg, args.workdir, progress=not args.no_progress, init_params=init)
    except ValueError as err:  # configuration problems found at start-up (vocab, mesh, workdir)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        return 143
    keys = ("val_ce", *(k for k in result if k.startswith("val_ce_")), "tokens_per_s", "steps")
    summary = {k: result[k] for k in keys}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Downstream evaluation of a checkpoint with lm-eval, and held-out perplexity.

    python -m experiments.evaluate --checkpoint runs/my_run --suite mesh-0shot --batch-size 16 \
        --out results/eval_my_run.json
    python -m experiments.evaluate --checkpoint runs/my_run --perplexity --tasks ""
    python -m experiments.evaluate --checkpoint ref_ckpt/ --preset paper-150m \
        --set data.sentencepiece_model=t5.model --tasks piqa,hellaswag

``--checkpoint`` is a run directory (its latest step, or ``--step``) or a reference-format
directory (``config.yaml`` + ``model.safetensors``; then ``--preset`` and ``--set data.*`` name the
tokenizer). ``--tasks`` are lm-eval task names (comma-separated; ``--include-path DIR`` adds task
YAMLs, e.g. ``tests/data`` for the offline tiny tasks); ``--suite`` takes the tasks and shot
count of a paper (``rt_jax.train.evaluation.SUITES``). lm-eval downloads the datasets of its
tasks (set ``HF_DATASETS_OFFLINE=1`` where they are cached already). ``--perplexity`` adds the
per-token cross-entropy and perplexity of the data config's validation split. Prints lm-eval's
table; ``--out`` writes the scores, the command and the commit as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from rt_jax.train.evaluation import SUITES

    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or reference checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--preset", default=None, help="data config for a reference checkpoint")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="data.FIELD=VALUE"
    )
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks")
    p.add_argument("--suite", default=None, choices=sorted(SUITES), help="a paper's tasks")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    p.add_argument(
        "--no-default-tasks",
        action="store_true",
        help="only the --include-path tasks (skips indexing lm-eval's own, which takes a while)",
    )
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="longest input in tokens")
    p.add_argument("--impl", default=None, choices=["reference", "tiled", "pallas"])
    p.add_argument("--interpret", action="store_true", help="Pallas kernels in interpret mode")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--perplexity", action="store_true", help="held-out perplexity too")
    p.add_argument("--perplexity-batches", type=int, default=None, help="cap (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results file")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate; the result dict (also written to ``args.out``). ValueError on bad input."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from experiments.provenance import git_commit, machine
    from rt_jax.train.evaluation import SUITES, RtJaxLM, heldout_perplexity, load_checkpoint

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    num_fewshot = args.num_fewshot
    if args.suite:
        suite = SUITES[args.suite]
        tasks += [t for t in suite["tasks"] if t not in tasks]
        if num_fewshot is None:
            num_fewshot = suite["num_fewshot"]
    if not tasks and not args.perplexity:
        raise ValueError("nothing to evaluate: pass --tasks, --suite or --perplexity")
    loaded = load_checkpoint(
        args.checkpoint,
        step=args.step,
        preset=args.preset,
        overrides=args.overrides,
        impl=args.impl,
        interpret=True if args.interpret else None,
        compute_dtype=args.dtype,
    )
    from rt_jax.data import build_tokenizer

    result: dict = {
        "command": "python -m experiments.evaluate " + " ".join(args.argv),
        "commit": git_commit(),
        "machine": machine(),
        "checkpoint": args.checkpoint,
        "kind": loaded.kind,
        "step": loaded.step,
        "family": loaded.model.config.family,
        "block_type": loaded.model.config.block_type,
    }
    if tasks:
        lm = RtJaxLM(
            model=loaded.model,
            tokenizer=build_tokenizer(loaded.data),
            batch_size=args.batch_size,
            max_length=args.max_length or loaded.max_length or loaded.data.seq_len,
            seed=args.seed,
        )
        if args.no_default_tasks and not args.include_path:
            raise ValueError("--no-default-tasks needs --include-path (the tasks to run)")
        manager = TaskManager(
            include_path=args.include_path, include_defaults=not args.no_default_tasks
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
        )
        print(make_table(out))
        result["lm_eval"] = {
            "tasks": tasks,
            "num_fewshot": num_fewshot,
            "limit": args.limit,
            "max_length": lm.max_length,
            "results": out["results"],
            "versions": out.get("versions", {}),
            "n-shot": out.get("n-shot", {}),
        }
    if args.perplexity:
        ppl = heldout_perplexity(loaded.model, loaded.data, max_batches=args.perplexity_batches)
        result["perplexity"] = ppl
        print(
            f"held-out ({loaded.data.corpus} validation, {int(ppl['tokens'])} tokens): "
            f"CE {ppl['ce']:.4f} nats/token, perplexity {ppl['ppl']:.3f}"
        )
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 2 with a message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(args)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())

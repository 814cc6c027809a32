"""Logging of the experiment scripts: a quiet console and a full log file in each run directory.

The console shows this project's own INFO lines (``experiments``, ``param_matched``, ``rt_jax``:
what trains where, evaluations, results) and every library's warnings and errors, written through
``tqdm.write`` so they do not tear the progress bars. Libraries' INFO records (Orbax saves, absl,
Grain) go only to ``<run dir>/log.txt`` while a run is active; ``--verbose`` also shows them on the
console.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

LOG_FILE = "log.txt"
OWN_LOGGERS = ("experiments", "param_matched", "rt_jax", "__main__")
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """Pass warnings and errors, and INFO from this project's loggers (everything if verbose)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the console shows ``record``."""
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] in OWN_LOGGERS


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that prints above running tqdm bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record with ``tqdm.write``."""
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Root logger at INFO with the quiet console handler (replaces absl's or any earlier one)."""
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter(_FORMAT))
    console.addFilter(_ConsoleFilter(verbose))
    logging.basicConfig(level=logging.INFO, handlers=[console], force=True)


@contextlib.contextmanager
def log_to_file(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Append every INFO-or-higher record (libraries included) to ``run_dir/log.txt`` in the block."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_FILE
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s " + _FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()

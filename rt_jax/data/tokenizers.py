"""Tokenizers: UTF-8 bytes, a byte-level BPE trained on the training split, SentencePiece.

Every tokenizer has ``vocab_size``, ``eos_id``, ``encode(str) -> list[int]``, ``decode(list[int]) ->
str`` and ``encode_array(str) -> np.ndarray`` (int32, no EOS). ``ModelConfig.vocab_size`` must equal
``vocab_size``. Documents are separated by ``eos_id`` when packed.

- ``byte``: ids 0..255 are the UTF-8 bytes, 256 is EOS: ``vocab_size`` 257.
- ``bpe``: byte-level BPE (``tokenizers``) with ``bpe_vocab_size`` entries including ``<eos>`` (id 0),
  trained on the corpus's training split and saved as
  ``<cache>/tokenizers/<corpus key>/bpe_<vocab>.json`` (reused after).
- ``sentencepiece``: the ``sentencepiece_model`` file; EOS is the model's ``</s>``; ``vocab_size`` is
  its piece count plus ``extra_ids`` (T5: 32000 + 100 = 32100).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from rt_jax.data import corpus as corpus_lib
from rt_jax.data.config import DataConfig

BYTE_EOS_ID = 256
BPE_EOS_TOKEN = "<eos>"


class Tokenizer(Protocol):
    """What the data pipeline, trainer and decoder use of a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        ...

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (no EOS added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (EOS and ids outside the vocabulary are dropped)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS as 256."""

    vocab_size = 257
    eos_id = BYTE_EOS_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (no EOS added)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (EOS dropped; invalid UTF-8 replaced)."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BpeTokenizer:
    """A byte-level BPE from the ``tokenizers`` library with an ``<eos>`` token."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        self.path = pathlib.Path(path)
        self._tok = HfTokenizer.from_file(os.fspath(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(BPE_EOS_TOKEN)
        if eos is None:
            raise ValueError(f"BPE tokenizer {self.path} has no {BPE_EOS_TOKEN} token")
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (no EOS added; long texts encoded by lines)."""
        if len(text) <= 1 << 16:
            return np.asarray(self.encode(text), dtype=np.int32)
        pieces = text.splitlines(keepends=True)
        encodings = self._tok.encode_batch(pieces, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (EOS dropped)."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.eos_id]
        return self._tok.decode(keep, skip_special_tokens=True)


class SentencePieceTokenizer:
    """A SentencePiece model file, with ``extra_ids`` unused ids after its pieces."""

    def __init__(self, path: str | os.PathLike, extra_ids: int = 0) -> None:
        import sentencepiece as spm

        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_file():
            raise ValueError(
                f"DataConfig.sentencepiece_model={os.fspath(path)!r} is not a file: point it at a "
                "SentencePiece .model file"
            )
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(self.path))
        self._pieces = self._sp.get_piece_size()
        self.vocab_size = self._pieces + extra_ids
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {self.path} has no EOS piece: train it with eos_id >= 0"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        return list(self._sp.encode(text))

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (no EOS added)."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (EOS and extra ids dropped)."""
        keep = [int(i) for i in ids if 0 <= int(i) < self._pieces and int(i) != self.eos_id]
        return self._sp.decode(keep)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> BpeTokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries on ``texts`` and save it at ``path``."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = tmp.name
    tok.save(tmp_path)
    os.replace(tmp_path, path)  # atomic: concurrent readers see a whole file
    return BpeTokenizer(path)


def bpe_path(cfg: DataConfig) -> pathlib.Path:
    """Where the BPE of ``cfg`` (corpus and vocab size) is saved."""
    from rt_jax.data.tfds_text import corpus_key, local_cache_dir

    return local_cache_dir(cfg) / "tokenizers" / corpus_key(cfg) / f"bpe_{cfg.bpe_vocab_size}.json"


def _training_texts(cfg: DataConfig) -> Iterable[str]:
    from rt_jax.data.tfds_text import document_source, document_text

    source = document_source(cfg, "train")
    count = min(len(source), cfg.bpe_train_documents)
    for index in range(count):
        text = document_text(source[index])
        # Lines, not whole documents: one multi-megabyte string makes training slow.
        yield from text.splitlines(keepends=True)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer of ``cfg`` (trains and saves the BPE on first use)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(cfg.sentencepiece_model, extra_ids=cfg.extra_ids)
    path = bpe_path(cfg)
    if not path.is_file():
        with corpus_lib.file_lock(path.parent / ".bpe.lock"):
            if not path.is_file():
                tok = train_bpe(_training_texts(cfg), cfg.bpe_vocab_size, path)
                if tok.vocab_size != cfg.bpe_vocab_size:
                    path.unlink()
                    raise ValueError(
                        f"the training split yields only {tok.vocab_size} BPE entries, fewer than "
                        f"DataConfig.bpe_vocab_size={cfg.bpe_vocab_size}: lower bpe_vocab_size"
                    )
                return tok
    return BpeTokenizer(path)

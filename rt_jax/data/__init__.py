"""Data: TFDS text corpora (Shakespeare, text folders, C4), tokenizers and Grain pipelines."""

from rt_jax.data.config import CORPORA, SPLITS, TOKENIZERS, DataConfig
from rt_jax.data.pipeline import make_iterator, tokenized_split
from rt_jax.data.tokenizers import (
    BpeTokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "CORPORA",
    "SPLITS",
    "TOKENIZERS",
    "BpeTokenizer",
    "ByteTokenizer",
    "DataConfig",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "make_iterator",
    "tokenized_split",
]

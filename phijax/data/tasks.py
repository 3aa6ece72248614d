"""seqio Tasks over Python-source corpora (``import phijax.data.tasks`` registers).

Pipeline per task: documents (sorted relpath order) -> BPE ids -> + EOS ->
one concatenated stream -> non-overlapping windows of exactly
``sequence_length["targets"]`` tokens. Only the final partial window is dropped
(no padding anywhere), which is how phi-1 style pretraining packs data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Mapping

import seqio
import tensorflow as tf

from phijax.data import corpus as corpus_lib
from phijax.data import vocab as vocab_lib
from phijax.data.seqio_vocab import HFBPEVocabulary

DEFAULT_TASK = "phijax_stdlib"


@dataclasses.dataclass(frozen=True)
class CorpusTaskInfo:
    """What the window cache keys on, kept beside the seqio registry."""

    corpus_root: Path
    vocab_size: int
    vocabulary: HFBPEVocabulary

    def corpus_fingerprint(self) -> str:
        return corpus_lib.corpus_fingerprint(self.corpus_root)


TASK_INFO: dict[str, CorpusTaskInfo] = {}


# --- source ------------------------------------------------------------------
def _corpus_dataset_fn(root: Path) -> Callable[..., tf.data.Dataset]:
    def dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed  # one ordered stream; shuffling happens on windows
        if split != "train":
            raise ValueError(f"corpus tasks only have a 'train' split, got {split!r}")

        def gen():
            for rel, text in corpus_lib.iter_documents(root):
                yield {"path": rel, "text": text}

        return tf.data.Dataset.from_generator(
            gen, output_signature={"path": tf.TensorSpec([], tf.string),
                                   "text": tf.TensorSpec([], tf.string)})

    return dataset_fn


# --- preprocessors -------------------------------------------------------------
def append_eos_always(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                      key: str = "targets") -> tf.data.Dataset:
    """Appends EOS to every document. (seqio.preprocessors.append_eos obeys
    Feature.add_eos, which must stay False or seqio would add EOS per window.)"""
    eos = output_features[key].vocabulary.eos_id

    def fn(ex):
        ex = dict(ex)
        ex[key] = tf.concat([ex[key], tf.constant([eos], ex[key].dtype)], axis=0)
        return ex

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def concat_and_split(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                     key: str = "targets") -> tf.data.Dataset:
    """Concatenates ``key`` over all examples and yields windows of exactly
    ``sequence_length[key]`` tokens; the trailing partial window is dropped.

    A scan carries the < L leftover tokens from one document to the next, so
    tf.data handles one element per window rather than one per token.
    """
    length = int(sequence_length[key])
    if length < 1:
        raise ValueError(f"sequence_length[{key!r}] must be >= 1, got {length}")

    def step(carry, ex):
        buf = tf.concat([carry, tf.cast(ex[key], tf.int32)], axis=0)
        n = tf.size(buf) // length
        windows = tf.reshape(buf[: n * length], [n, length])
        return buf[n * length:], windows

    init = tf.zeros([0], tf.int32)
    ds = dataset.scan(init, step).unbatch()
    return ds.map(lambda w: {key: tf.ensure_shape(w, [length])})


# --- registration ----------------------------------------------------------------
def register_corpus_task(name: str, corpus_root: str | os.PathLike, vocab_size: int,
                         tokenizer_path: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None,
                         overwrite: bool = True) -> seqio.Task:
    """Registers a task over ``corpus_root``. The tokenizer (trained on that same
    corpus and cached, unless ``tokenizer_path`` is given) is resolved lazily,
    so registration costs nothing until the task is used."""
    root = Path(corpus_root).resolve()
    if tokenizer_path is not None:
        vocabulary = HFBPEVocabulary(Path(tokenizer_path))
    else:
        tag = "stdlib" if root == corpus_lib.stdlib_root() else "corpus"
        vocabulary = HFBPEVocabulary(functools.partial(
            vocab_lib.corpus_tokenizer_path, root, vocab_size, cache_dir, tag))
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"task {name!r} is already registered")
        seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_corpus_dataset_fn(root), splits=["train"]),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=False),
            append_eos_always,
            concat_and_split,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        # Documents are read in a fixed order; no seqio-level shuffling.
        shuffle_buffer_size=None,
    )
    TASK_INFO[name] = CorpusTaskInfo(root, vocab_size, vocabulary)
    return task


def stdlib_task_name(vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE) -> str:
    return DEFAULT_TASK if vocab_size == vocab_lib.DEFAULT_VOCAB_SIZE else f"{DEFAULT_TASK}_v{vocab_size}"


def register_stdlib_task(vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE, name: str | None = None,
                         cache_dir: str | os.PathLike | None = None) -> seqio.Task:
    return register_corpus_task(name or stdlib_task_name(vocab_size), corpus_lib.stdlib_root(),
                                vocab_size, cache_dir=cache_dir)


def ensure_stdlib_task(vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE) -> str:
    """Name of the stdlib task for ``vocab_size``, registering it if needed."""
    name = stdlib_task_name(vocab_size)
    if name not in seqio.TaskRegistry.names():
        register_stdlib_task(vocab_size, name)
    return name


# --- fine-tuning exercises (prompt -> solution) -------------------------------------
EXERCISES_TASK = "phijax_exercises"


def _exercises_dataset_fn(path: Path, max_record_bytes: int) -> Callable[..., tf.data.Dataset]:
    def dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed
        if split != "train":
            raise ValueError(f"exercises tasks only have a 'train' split, got {split!r}")
        from phijax.data import packing

        def gen():
            # Bad records are skipped and counted (logged) by the same reader the
            # packed cache uses, so both paths see the same examples.
            report = packing.ReadReport()
            for rec in packing.iter_exercises(path, report, max_record_bytes):
                yield {"inputs": rec["prompt"], "targets": rec["solution"]}
            if report.n_skipped:
                packing.log.warning("%s: skipped %s", path, report.as_dict())

        return tf.data.Dataset.from_generator(
            gen, output_signature={"inputs": tf.TensorSpec([], tf.string),
                                   "targets": tf.TensorSpec([], tf.string)})

    return dataset_fn


def register_exercises_task(name: str, path: str | os.PathLike,
                            vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                            tokenizer_path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None,
                            max_record_bytes: int | None = None,
                            overwrite: bool = True) -> seqio.Task:
    """A seqio Task over an exercises JSONL (see ``phijax.data.packing``): one
    example per valid record, 'inputs' = prompt, 'targets' = solution + EOS
    (token ids; the texts are kept as 'inputs_pretokenized'/'targets_pretokenized').
    The vocabulary is ``tokenizer_path`` or the stdlib BPE of ``vocab_size``.
    ``name`` is typically EXERCISES_TASK ("phijax_exercises").
    For training, prefer ``make_batches("exercises", data_path=...)`` (packed, no tf)."""
    from phijax.data import packing

    if not Path(path).is_file():
        raise ValueError(f"register_exercises_task: {path!r} is not a file (an exercises JSONL)")
    if tokenizer_path is not None:
        vocabulary = HFBPEVocabulary(Path(tokenizer_path))
    else:
        vocabulary = HFBPEVocabulary(functools.partial(
            vocab_lib.stdlib_tokenizer_path, vocab_size, cache_dir))
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"task {name!r} is already registered")
        seqio.TaskRegistry.remove(name)
    limit = packing.DEFAULT_MAX_RECORD_BYTES if max_record_bytes is None else int(max_record_bytes)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_exercises_dataset_fn(Path(path).resolve(), limit),
                                        splits=["train"]),
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True, with_eos=False),
            append_eos_always,  # key="targets"
        ],
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=None,
    )


register_stdlib_task()

"""seqio Tasks and Mixtures (``import phijax.data.seqio_tasks`` registers the stdlib task;
``import phijax.tasks`` is the gin-facing registry with the rest).

Pretraining task pipeline: documents (one fixed order) -> BPE ids -> + EOS ->
[CacheDatasetPlaceholder] -> one concatenated stream -> non-overlapping windows
of exactly ``sequence_length["targets"]`` tokens. Only the final partial window
is dropped (no padding anywhere), which is how phi-1 style pretraining packs data.

Sources are ``OrderedSource``s: shard i of n is the i-th *contiguous* slice of the
documents, so the shards' token streams concatenated in order are the whole
task's stream -- what the Beam cache (``phijax.data.beam_cache``) relies on to
write exactly the windows the in-process cache would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import seqio
import tensorflow as tf

from phijax.data import corpus as corpus_lib
from phijax.data import vocab as vocab_lib
from phijax.data.seqio_vocab import HFBPEVocabulary
from phijax.util import files

DEFAULT_TASK = "phijax_stdlib"


@dataclasses.dataclass(frozen=True)
class CorpusTaskInfo:
    """What the window cache keys on, kept beside the seqio registry.
    ``fingerprint_fn`` (e.g. a TFDS build's source fingerprint) replaces the
    directory fingerprint of ``corpus_root`` when given."""

    corpus_root: Path | None  # None: not a directory corpus (see fingerprint_fn)
    vocab_size: int
    vocabulary: HFBPEVocabulary
    fingerprint_fn: Callable[[], str] | None = None

    def corpus_fingerprint(self) -> str:
        if self.fingerprint_fn is not None:
            return self.fingerprint_fn()
        return corpus_lib.corpus_fingerprint(self.corpus_root)


TASK_INFO: dict[str, CorpusTaskInfo] = {}


# --- sources -------------------------------------------------------------------
class OrderedSource(seqio.DataSource):
    """A seqio DataSource with one fixed example order whose shard i of n is the
    i-th contiguous slice (seqio's default would take every n-th example).
    ``slice_fn(split, index, num_shards)`` returns that slice as a tf.data
    Dataset. ``shuffle`` is ignored: order is part of the data's identity and
    shuffling happens on windows (``phijax.data.pipeline``)."""

    def __init__(self, slice_fn: Callable[[str, int, int], tf.data.Dataset], splits):
        super().__init__(splits=splits)
        self._slice_fn = slice_fn

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str):
        return [split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None, *,
                    sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
        del shuffle, seed, sequence_length, use_cached, num_epochs
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not one of {list(self.splits)}")
        index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        if not 0 <= index < num:
            raise ValueError(f"bad shard {index} of {num}")
        return self._slice_fn(split, index, num)


def shard_bounds(n: int, index: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of contiguous shard ``index`` of ``num_shards`` over n items."""
    return index * n // num_shards, (index + 1) * n // num_shards


def _corpus_slice_fn(root: Path) -> Callable[[str, int, int], tf.data.Dataset]:
    def slice_fn(split: str, index: int, num_shards: int) -> tf.data.Dataset:
        if split != "train":
            raise ValueError(f"corpus tasks only have a 'train' split, got {split!r}")
        start, stop = shard_bounds(len(corpus_lib.python_files(root)), index, num_shards)

        def gen():
            for rel, text in corpus_lib.iter_documents(root, start=start, stop=stop):
                yield {"path": rel, "text": text}

        return tf.data.Dataset.from_generator(
            gen, output_signature={"path": tf.TensorSpec([], tf.string),
                                   "text": tf.TensorSpec([], tf.string)})

    return slice_fn


def tfds_slice_fn(builder_fn: Callable[[], Any]) -> Callable[[str, int, int], tf.data.Dataset]:
    """Contiguous example ranges of a prepared TFDS builder (built in source
    order; ``builder_fn`` prepares it on first use)."""

    def slice_fn(split: str, index: int, num_shards: int) -> tf.data.Dataset:
        builder = builder_fn()
        if split not in builder.info.splits:
            raise ValueError(f"{builder.name} has no split {split!r} (has {list(builder.info.splits)})")
        start, stop = shard_bounds(builder.info.splits[split].num_examples, index, num_shards)
        if start == stop:
            return builder.as_dataset(split=split, shuffle_files=False).take(0)
        return builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False)

    return slice_fn


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
    _replace(name, overwrite)
    task = _add_text_task(name, OrderedSource(_corpus_slice_fn(root), ["train"]), "text", vocabulary)
    TASK_INFO[name] = CorpusTaskInfo(root, vocab_size, vocabulary)
    return task


def _add_text_task(name: str, source: seqio.DataSource, text_key: str,
                   vocabulary: HFBPEVocabulary) -> seqio.Task:
    """The pretraining preprocessing, shared by every text task."""
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=False),
            append_eos_always,
            # Tokenized documents (+ EOS) before this, windows after: what
            # task_token_count and the Beam cache read (preprocess_precache).
            seqio.CacheDatasetPlaceholder(),
            concat_and_split,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        # Documents are read in a fixed order; no seqio-level shuffling.
        shuffle_buffer_size=None,
    )


def _vocabulary(tokenizer_path, vocab_size: int, cache_dir) -> HFBPEVocabulary:
    """``tokenizer_path`` (e.g. codegen's tokenizer.json), else the stdlib BPE of
    ``vocab_size`` (lazy: trained/loaded on first use)."""
    if tokenizer_path is not None:
        return HFBPEVocabulary(Path(tokenizer_path))
    return HFBPEVocabulary(functools.partial(vocab_lib.stdlib_tokenizer_path, vocab_size, cache_dir))


def _replace(name: str, overwrite: bool) -> None:
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"task {name!r} is already registered")
        seqio.TaskRegistry.remove(name)
    TASK_INFO.pop(name, None)


def register_tfds_text_task(name: str, builder_fn: Callable[[], Any], text_key: str, *,
                            vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                            tokenizer_path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None,
                            overwrite: bool = True) -> seqio.Task:
    """A pretraining task over the ``text_key`` feature of a TFDS builder's
    'train' split (``builder_fn`` returns the builder prepared; it is called on
    first use, not at registration)."""
    _replace(name, overwrite)
    vocabulary = _vocabulary(tokenizer_path, vocab_size, cache_dir)
    builder_fn = _once(builder_fn)
    task = _add_text_task(name, OrderedSource(tfds_slice_fn(builder_fn), ["train"]), text_key, vocabulary)

    def fingerprint() -> str:
        b = builder_fn()
        return f"{b.name}/{b.builder_config.name}:{b.version}:{(b.info.metadata or {}).get('source_fingerprint')}"

    TASK_INFO[name] = CorpusTaskInfo(None, vocab_size, vocabulary, fingerprint_fn=fingerprint)
    return task


def _once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` called at most once (thread-safe enough for tf.data's threads:
    a duplicate call only re-opens a prepared builder)."""
    box: list = []

    def wrapper():
        if not box:
            box.append(fn())
        return box[0]

    return wrapper


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


# --- TFDS-backed user data ------------------------------------------------------------
def tfds_data_dir(data_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Where builders prepare datasets by default: ``<cache>/tfds``."""
    if data_dir is not None:
        return Path(data_dir)
    return (Path(cache_dir) if cache_dir is not None else files.default_cache_dir()) / "tfds"


def dataset_name_for(sources) -> str:
    """A TFDS config name for user sources: readable stem + hash of the paths,
    so different sources never share a prepared dataset by accident."""
    paths = [str(Path(s).expanduser().resolve()) for s in
             ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    if not paths:
        raise ValueError("no sources given")
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(paths[0]).name.split(".")[0])
    return f"{stem or 'data'}-{hashlib.sha256(chr(0).join(paths).encode()).hexdigest()[:8]}"


def builder_fn(builder_cls_name: str, data_dir: Path, **kwargs) -> Callable[[], Any]:
    """A zero-argument function that prepares (once) and returns the builder."""

    def make():
        from phijax.data import tfds_builders

        return tfds_builders.prepare(tfds_builders.BUILDERS[builder_cls_name], data_dir, **kwargs)

    return make


EXERCISES_TASK = "phijax_exercises"


def register_exercises_task(name: str, path: str | os.PathLike,
                            vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                            tokenizer_path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None,
                            max_record_bytes: int | None = None,
                            overwrite: bool = True,
                            data_dir: str | os.PathLike | None = None) -> seqio.Task:
    """A seqio Task over CodeExercises JSONL (a file, or a directory of shards),
    read through the ``CodeExercises`` TFDS builder (prepared on first use in
    ``data_dir``, default ``<cache>/tfds``; bad records skipped and reported there).
    One example per valid record, in file order: 'inputs' = prompt ids,
    'targets' = solution ids + EOS (texts kept as '*_pretokenized').
    ``name`` is typically EXERCISES_TASK ("phijax_exercises").
    For training, prefer ``make_batches("exercises", data_path=...)`` (packed, no tf;
    the same record validation)."""
    from phijax.data import packing

    if not Path(path).exists():
        raise ValueError(f"register_exercises_task: {path!r} does not exist (an exercises JSONL or a directory)")
    vocabulary = _vocabulary(tokenizer_path, vocab_size, cache_dir)
    _replace(name, overwrite)
    limit = packing.DEFAULT_MAX_RECORD_BYTES if max_record_bytes is None else int(max_record_bytes)
    make = _once(builder_fn("phijax_exercises", tfds_data_dir(data_dir, cache_dir), sources=[path],
                            dataset_name=dataset_name_for([path]), max_record_bytes=limit))
    return seqio.TaskRegistry.add(
        name,
        source=OrderedSource(tfds_slice_fn(make), ["train"]),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"inputs": "prompt", "targets": "solution"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True, with_eos=False),
            append_eos_always,  # key="targets"
        ],
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=None,
    )


# --- evaluation tasks ---------------------------------------------------------------------
HUMANEVAL_TASK = "phijax_humaneval"
MBPP_TASK = "phijax_mbpp"


def _eval_task(name: str, make: Callable[[], Any], splits, key_map: Mapping[str, str],
               vocabulary: HFBPEVocabulary) -> seqio.Task:
    """inputs = the prompt the model completes; targets = the reference solution
    (+ EOS); every other field (tests, entry point, task id) passes through as
    metadata for the evaluator. The rekey keeps the originals too."""

    def keep_all(ds):
        return ds.map(lambda ex: {**ex, **{k: ex[v] for k, v in key_map.items()}})

    return seqio.TaskRegistry.add(
        name,
        source=OrderedSource(tfds_slice_fn(make), splits),
        preprocessors=[
            keep_all,
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True, with_eos=False),
            append_eos_always,
        ],
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=None,
    )


def register_eval_tasks(vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                        tokenizer_path: str | os.PathLike | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        data_dir: str | os.PathLike | None = None,
                        suffix: str = "", humaneval_path: str | os.PathLike | None = None) -> list[str]:
    """Registers ``phijax_humaneval{suffix}`` (split 'test': inputs = prompt,
    targets = canonical_solution; test, entry_point, task_id kept) and
    ``phijax_mbpp{suffix}`` (splits prompt/test/validation/train: inputs = the
    problem text, targets = the reference code; test_list, test_setup_code,
    task_id kept). Both read the TFDS builders, prepared on first use."""
    vocabulary = _vocabulary(tokenizer_path, vocab_size, cache_dir)
    ddir = tfds_data_dir(data_dir, cache_dir)
    he_kwargs = {"sources": [humaneval_path]} if humaneval_path is not None else {}
    names = [HUMANEVAL_TASK + suffix, MBPP_TASK + suffix]
    for n in names:
        _replace(n, True)
    _eval_task(names[0], _once(builder_fn("phijax_humaneval", ddir, **he_kwargs)), ["test"],
               {"inputs": "prompt", "targets": "canonical_solution"}, vocabulary)
    from phijax.data import benchmarks

    _eval_task(names[1], _once(builder_fn("phijax_mbpp", ddir)), list(benchmarks.MBPP_SPLITS),
               {"inputs": "text", "targets": "code"}, vocabulary)
    return names


# --- token counts and mixtures --------------------------------------------------------------
def task_token_count(task_name: str, cache_dir: str | os.PathLike | None = None) -> int:
    """Tokens (document tokens + one EOS each) of a text task's 'train' split,
    computed once with the task's own seqio preprocessing (up to its
    CacheDatasetPlaceholder) and cached, keyed by vocabulary + corpus fingerprints."""
    import json

    from phijax.data import cache

    task = seqio.get_mixture_or_task(task_name)
    info = TASK_INFO.get(task_name)
    if info is None or not task.supports_caching:
        raise ValueError(f"task {task_name!r} is not a phijax text task (no token count)")
    key_fields = {"task": task_name, "vocab_fingerprint": info.vocabulary.fingerprint,
                  "corpus_fingerprint": info.corpus_fingerprint()}
    root = Path(cache_dir) if cache_dir is not None else files.default_cache_dir()
    path = cache.keyed_dir(root, "token_counts", task_name, key_fields).with_suffix(".json")
    if path.exists():
        return int(json.loads(path.read_text())["n_tokens"])
    ds = task.preprocess_precache(task.source.get_dataset("train", shuffle=False))
    sizes = ds.map(lambda ex: tf.size(ex["targets"], out_type=tf.int64),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    n = int(sizes.reduce(tf.constant(0, tf.int64), lambda a, b: a + b).numpy())
    vocab_lib.atomic_write_bytes(path, json.dumps(dict(key_fields, n_tokens=n)).encode())
    return n


def token_count_rate(task: seqio.Task, cache_dir: str | os.PathLike | None = None) -> float:
    """Mixture rate in proportion to a task's tokens (the default for CodeTextbook)."""
    return float(task_token_count(task.name, cache_dir))


def register_mixture(name: str, tasks_and_rates, overwrite: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> seqio.Mixture:
    """``tasks_and_rates``: [(task_name, rate or None)]; None = in proportion to
    tokens (counted once, cached in ``cache_dir``)."""
    if name in seqio.MixtureRegistry.names():
        if not overwrite:
            raise ValueError(f"mixture {name!r} is already registered")
        seqio.MixtureRegistry.remove(name)
    pairs = []
    for t, r in tasks_and_rates:
        if r is not None and not float(r) > 0:
            raise ValueError(f"mixture {name!r}: rate of {t!r} must be > 0, got {r}")
        pairs.append((t, functools.partial(token_count_rate, cache_dir=cache_dir) if r is None else float(r)))
    return seqio.MixtureRegistry.add(name, pairs)


register_stdlib_task()

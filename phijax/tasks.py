"""The SeqIO registry, for code and gin: ``import phijax.tasks``.

Registered on import (lazily: nothing is read, trained or built until a task is used):
  * ``phijax_stdlib``    -- the embedded default corpus (phijax.data.seqio_tasks)
  * ``phijax_humaneval`` -- HumanEval, split 'test' (inputs = prompt, targets = canonical solution)
  * ``phijax_mbpp``      -- MBPP, splits prompt/test/validation/train (inputs = text, targets = code)
with the stdlib BPE vocabulary. User data is registered from gin, e.g.::

    import phijax.tasks
    data_source.kind = 'task'
    data_source.task_name = @phijax.tasks.register_codetextbook()
    phijax.tasks.register_codetextbook.code = ['/data/stack-python']       # dirs / parquet / jsonl
    phijax.tasks.register_codetextbook.textbook = ['/data/textbook']       # JSONL shards
    phijax.tasks.register_codetextbook.tokenizer_path = '/models/codegen-350M-mono/tokenizer.json'

``register_codetextbook`` registers ``<name>_code`` and ``<name>_textbook`` (TFDS
builders prepared on first use) and the Mixture ``<name>`` with rates in
proportion to tokens unless given, and returns the mixture's name.
"""
from __future__ import annotations

import os
from typing import Sequence

import gin

from phijax.data import records, seqio_tasks as data_tasks
from phijax.data import vocab as vocab_lib

CODETEXTBOOK = "codetextbook"


@gin.configurable(module="phijax.tasks")
def register_codetextbook(name: str = CODETEXTBOOK, *, code: Sequence[str] | str | None = None,
                          textbook: Sequence[str] | str | None = None,
                          code_rate: float | None = None, textbook_rate: float | None = None,
                          tokenizer_path: str | None = None,
                          vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
                          data_dir: str | None = None, cache_dir: str | None = None,
                          code_suffixes: Sequence[str] = (".py",), content_field: str = "content",
                          quality_field: str | None = None, min_quality: float | None = None,
                          max_record_bytes: int = records.DEFAULT_MAX_RECORD_BYTES) -> str:
    """Registers phi-1's pretraining mixture over the user's data; returns its name.

    ``code``: source directories and/or The Stack-style parquet/JSONL shards (the
    filtered-code part; ``quality_field``/``min_quality`` apply a classifier score
    stored in the shards). ``textbook``: synthetic-textbook JSONL shards. Either may
    be omitted (a one-task mixture). Rates default to each task's token count.
    """
    if not code and not textbook:
        raise ValueError("register_codetextbook needs code and/or textbook sources")
    ddir = data_tasks.tfds_data_dir(data_dir, cache_dir)
    common = dict(vocab_size=vocab_size, tokenizer_path=tokenizer_path, cache_dir=cache_dir)
    parts = []
    if code:
        sources = [code] if isinstance(code, (str, os.PathLike)) else list(code)
        make = data_tasks.builder_fn(
            "phijax_code", ddir, sources=sources, dataset_name=data_tasks.dataset_name_for(sources),
            suffixes=tuple(code_suffixes), content_field=content_field, quality_field=quality_field,
            min_quality=min_quality, max_record_bytes=max_record_bytes)
        data_tasks.register_tfds_text_task(f"{name}_code", make, "content", **common)
        parts.append((f"{name}_code", code_rate))
    if textbook:
        sources = [textbook] if isinstance(textbook, (str, os.PathLike)) else list(textbook)
        make = data_tasks.builder_fn("phijax_textbook", ddir, sources=sources,
                                     dataset_name=data_tasks.dataset_name_for(sources),
                                     max_record_bytes=max_record_bytes)
        data_tasks.register_tfds_text_task(f"{name}_textbook", make, "text", **common)
        parts.append((f"{name}_textbook", textbook_rate))
    data_tasks.register_mixture(name, parts, cache_dir=cache_dir)
    return name


@gin.configurable(module="phijax.tasks")
def register_eval_tasks(**kwargs) -> list[str]:
    """gin entry to ``phijax.data.seqio_tasks.register_eval_tasks`` (e.g. with the
    model's tokenizer_path and a name suffix)."""
    return data_tasks.register_eval_tasks(**kwargs)


data_tasks.register_eval_tasks()

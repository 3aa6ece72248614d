"""The heavy quality-filter stages as Apache Beam pipelines: dedup, classifier scoring and
decontamination (DirectRunner here; Dataflow, Flink or Spark on a real corpus).

    python -m data_gen.beam_stages dedup --inputs D/ingest/shards --out_dir D/dedup [--threshold 0.8]
    python -m data_gen.beam_stages score --model D/clf --inputs D/dedup/shards/*.jsonl --out_dir D/scored
    python -m data_gen.beam_stages decontaminate --inputs D/filtered/*.jsonl --out_dir D/decontam \\
        [--embed model:PATH] [--runner DirectRunner] [-- <Beam pipeline options>]

Each stage wraps its in-process implementation (``data_gen.dedup``, ``classifier.QualityClassifier``,
``decontaminate.Decontaminator``) and writes the same files with the same content; see
docs/beam_stages.md. The shape of every pipeline:

  1. read: one input file per element, streamed by the stage's own reader; each record is keyed
     by ``(file index, line)``, the stable order the in-process stage uses;
  2. decide: per document in parallel (``BatchElements`` batches for the model-backed stages);
     only small decisions leave this step (a score, a removed line number, a flagged pair);
  3. write: each output file is written by a worker that streams its input again and applies
     the decisions of that file, so no step holds document texts beyond a file being read.

Held in memory: the benchmark index (one per decontamination worker), one LSH band group, a
file's decisions (one float or line number per record) and, on one worker, the verified
near-duplicate edges and the flagged pairs (small next to the corpus; see the docs).

Resumable per stage as ``data_gen.ingest`` is: ``_COMPLETE`` with the input fingerprint is written
last; a rerun with the same inputs and options returns the stored report (``"resumed": true``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import time
import types
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from data_gen import classifier, dedup, ingest, minhash, stage
from data_gen import decontaminate as D
from phijax.data import records
from phijax.util import cli

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"  # what the pipeline hands back to the launcher, in its temp dir
TMP_PREFIX = ".beam-tmp-"
DEFAULT_BATCH = (16, 256)  # BatchElements min/max: model features want full accelerator batches
BadInput = (ingest.IngestError, classifier.InputError, D.DecontamError)


# --- storage: local paths through data_gen.stage, URLs (gs://...) through Beam -------------------
def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


class BeamFiles:
    """``stage.LocalFiles``' operations on URLs, through Beam's FileSystems (an object store has no
    directories to make, and no rename of a whole directory: its files move one by one)."""

    join = staticmethod(posixpath.join)

    @staticmethod
    def exists(path: str) -> bool:
        return FileSystems.exists(path)

    @staticmethod
    def read_text(path: str) -> str:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read().decode("utf-8")

    @staticmethod
    def write_bytes(path: str, data: bytes) -> None:
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)

    @staticmethod
    def delete(path: str) -> None:
        if FileSystems.exists(path):
            FileSystems.delete([path])

    @staticmethod
    def makedirs(path: str) -> None:
        pass

    @staticmethod
    def move(src: str, dst: str) -> None:
        BeamFiles.delete(dst)
        FileSystems.rename([src], [dst])

    @staticmethod
    def replace_dir(src: str, dst: str) -> None:
        old = [m.path for m in FileSystems.match([posixpath.join(dst, "*")])[0].metadata_list]
        if old:
            FileSystems.delete(old)
        new = sorted(m.path for m in FileSystems.match([posixpath.join(src, "*")])[0].metadata_list)
        FileSystems.rename(new, [posixpath.join(dst, posixpath.basename(p)) for p in new])

    rmtree = delete


def storage(path: str | os.PathLike):
    """Where ``path`` lives: ``stage.LocalFiles`` or ``BeamFiles``."""
    return BeamFiles if is_remote(path) else stage.LocalFiles


def _join(root: str, *parts: str) -> str:
    return storage(root).join(root, *parts)


def _basename(path: str) -> str:
    return posixpath.basename(path) if is_remote(path) else Path(path).name


class _RemoteFile:
    """A matched URL as ``stage.fingerprint`` sees a file: its name, size and mtime."""

    def __init__(self, meta):
        self.path = meta.path
        self._stat = types.SimpleNamespace(st_size=meta.size_in_bytes,
                                           st_mtime_ns=int(meta.last_updated_in_seconds * 1e9))

    def __str__(self) -> str:
        return self.path

    def stat(self):
        return self._stat


def match_remote(patterns: Sequence[str]) -> list[str]:
    out = []
    for pat in patterns:
        found = sorted(m.path for m in FileSystems.match([pat])[0].metadata_list)
        if not found:
            raise ingest.IngestError(f"input {pat!r} matches no files")
        out += found
    return out


def fingerprint(name: str, files: Sequence[str], extra: dict) -> str:
    """``ingest.fingerprint`` of the files (names, sizes, mtimes) + options; dedup's equals
    ``data_gen.dedup``'s, so either run's complete output satisfies the other."""
    objs = [_RemoteFile(FileSystems.match([f])[0].metadata_list[0]) if is_remote(f) else Path(f) for f in files]
    return ingest.fingerprint(name, objs, extra=extra)


def _read_text(path: str) -> str:
    return storage(path).read_text(path)


def _write_bytes(path: str, data: bytes) -> None:
    storage(path).write_bytes(path, data)


def _stage(out: str, fp: str, report_file: str, name: str) -> stage.Stage:
    return stage.Stage(out, fp, report_file, f"beam {name}", fs=storage(out))


def _move(src: str, dst: str) -> None:
    """One finished file into place (replacing an old one)."""
    storage(dst).move(src, dst)


def _move_dir(src: str, dst: str) -> None:
    """A finished directory into place as a whole (an old one is dropped)."""
    storage(dst).replace_dir(src, dst)


def _delete_tree(path: str) -> None:
    storage(path).rmtree(path)


@contextlib.contextmanager
def _local(path: str) -> Iterator[Path]:
    """A local path with ``path``'s bytes: the file itself, or a streamed copy of a URL (same
    name, so ``.gz`` still decompresses) for the readers that want a local file."""
    if not is_remote(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / _basename(path)
        with open(local, "wb") as dst, FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield local


# --- reading ---------------------------------------------------------------------------------
class Reader:
    """A stage's own reader of one input file -> (line, record), so the Beam stage keeps and
    skips exactly what the in-process one does:

    * ``records``: ``phijax.data.records.iter_jsonl`` with the required text fields (bad lines
      counted and skipped; ``strict``: a bad line is an error, as decontaminate's ``--strict``
      up-front validation makes it);
    * ``classifier``: ``data_gen.classifier``'s reader (non-blank lines; a record without a
      string text field is an error, as ``classifier.validate_inputs`` makes it)."""

    def __init__(self, kind: str, fields: Sequence[str], strict: bool):
        self.kind, self.fields, self.strict = kind, tuple(fields), strict

    def __call__(self, path: str, report: records.ReadReport) -> Iterator[tuple[int, dict]]:
        name = _basename(path)
        with _local(path) as local:
            if self.kind == "classifier":
                try:
                    for n, rec in classifier._iter_jsonl(local):
                        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) for f in self.fields):
                            raise classifier.InputError(f"{path}:{n}: expected a JSON object with a string "
                                                        f"{self.fields[0]!r} field")
                        report.n_lines += 1
                        report.n_ok += 1
                        yield n, rec
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise classifier.InputError(f"{path}: not valid JSONL ({e})") from None
                return
            for rec in records.iter_jsonl(local, report, required=self.fields, where_prefix=f"{name}:"):
                if self.strict and report.n_skipped:
                    break
                yield rec.pop("_line"), rec
            if self.strict and report.n_skipped:
                where, why, detail = report.samples[0]
                raise D.DecontamError(f"{path}: line {where}: {why} {detail}".rstrip())


def _sum_reports(reports: Sequence[dict]) -> dict:
    """Per-file ``ReadReport.as_dict()``s -> the one a single reader over all files gives."""
    skipped = Counter()
    for r in reports:
        skipped.update(r["skipped"])
    return {"n_lines": sum(r["n_lines"] for r in reports), "n_ok": sum(r["n_ok"] for r in reports),
            "n_skipped": sum(r["n_skipped"] for r in reports), "skipped": dict(sorted(skipped.items()))}


class _ReadFile(beam.DoFn):
    """(file index, path) -> ((file index, line), record); a ``report`` output per file."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def process(self, item):
        fi, path = item
        report = records.ReadReport()
        for line, rec in self.reader(path, report):
            yield (fi, line), rec
        yield beam.pvalue.TaggedOutput("report", (fi, report.as_dict()))


def _read(p, files: Sequence[str], reader: Reader):
    files_pc = p | "Files" >> beam.Create(list(enumerate(files)))
    read = (files_pc | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFile(reader)).with_outputs("report", main="docs"))
    return files_pc, read.docs, read.report


# --- writing: stream an input again, applying its decisions ------------------------------------
def _scored_line(rec: dict, score: float) -> str:
    return json.dumps({**rec, "quality_score": round(float(score), 6)}, ensure_ascii=False)


def _kept_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


class _RewriteFile(beam.DoFn):
    """(file index, {"path", "decision": [(line, value)]}) -> ``out_dir/<name>``:

    * ``mode="annotate"``: every record, written with its value (``_scored_line``);
    * ``mode="drop"``: the records without a decision, unchanged.

    Holds one file's decisions, never its texts."""

    def __init__(self, reader: Reader, out_dir: str, names: Sequence[str], mode: str):
        self.reader, self.out_dir, self.names, self.mode = reader, out_dir, list(names), mode

    def process(self, item):
        fi, grouped = item
        [path] = grouped["path"]
        decision = dict(grouped["decision"])
        out = _join(self.out_dir, self.names[fi])
        n = 0
        with FileSystems.create(out, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for line, rec in self.reader(path, records.ReadReport()):
                if self.mode == "annotate":
                    if line not in decision:
                        raise RuntimeError(f"{path}:{line} was read again but has no score")
                    f.write((_scored_line(rec, decision[line]) + "\n").encode("utf-8"))
                elif line not in decision:
                    f.write((_kept_line(rec) + "\n").encode("utf-8"))
                else:
                    continue
                n += 1
        yield fi, n


def _rewrite(files_pc, decisions, reader: Reader, out_dir: str, names: Sequence[str], mode: str):
    """Every input file gets its output file, also one with no decisions."""
    return ({"path": files_pc, "decision": decisions} | "JoinDecisions" >> beam.CoGroupByKey()
            | "Rewrite" >> beam.ParDo(_RewriteFile(reader, out_dir, names, mode)))


def _write_summary(_, path: str, **parts) -> None:
    _write_bytes(path, json.dumps(parts, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
                 .encode())


def _options(pipeline_args: Sequence[str]) -> tuple[PipelineOptions, str]:
    args = list(pipeline_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = ["--runner=DirectRunner", *args]
    opts = PipelineOptions(args)
    return opts, str(opts.view_as(StandardOptions).runner)


def _run_pipeline(build, pipeline_args: Sequence[str], tmp: str) -> tuple[dict, str]:
    """Builds (``build(p, tmp)``) and runs a pipeline; returns its summary and the runner's name."""
    opts, runner = _options(pipeline_args)
    with beam.Pipeline(options=opts) as p:
        build(p, tmp)
    return json.loads(_read_text(_join(tmp, SUMMARY_FILE))), runner


def _tmp_dir(out: str) -> str:
    """A new temp dir's name in ``out``; the temp dirs of killed runs are dropped."""
    if not is_remote(out):
        for old in Path(out).glob(TMP_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
    return _join(out, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}")


# --- dedup -------------------------------------------------------------------------------------
class _Sign(beam.DoFn):
    """((file, line), record) -> (content hash, (key, id, MinHash signature or None)), with
    ``data_gen.dedup``'s hash and the signature of the same ``NearDupFilter`` settings."""

    def __init__(self, cfg: dedup.DedupConfig, names: Sequence[str]):
        self.cfg, self.names = cfg, list(names)

    def setup(self):
        c = self.cfg
        self.near = minhash.NearDupFilter(c.threshold, c.num_perm, c.ngram, seed=c.seed) if c.near else None

    def process(self, item):
        key, rec = item
        text = rec[self.cfg.text_field]
        rid = str(rec.get("id") or f"{self.names[key[0]]}:{key[1]}")
        sig = self.near.hasher.signature(text, self.near.ngram, self.near.unit) if self.near is not None else None
        yield dedup.content_hash(text), (key, rid, sig)


def _split_exact(item):
    """A content-hash group -> its first document (main output) and the later copies."""
    _, docs = item
    first, *copies = sorted(docs, key=lambda d: d[0])
    yield first
    for key, rid, _ in copies:
        yield beam.pvalue.TaggedOutput("copy", (first[0], (key, rid, first[1])))


def _band_keys(doc, bands: int, rows: int):
    # The same band cut as minhash.LSHIndex (``_keys``), keyed for a GroupByKey.
    key, rid, sig = doc
    for band, k in minhash.LSHIndex(len(sig), bands, rows)._keys(sig):
        yield (band, k), (key, rid, sig)


def verified_pairs(group, threshold: float, bands: int, rows: int):
    """(band key, docs) -> (earlier key, later key, estimated Jaccard, earlier id, later id, first
    common band) for every pair of the group with estimated Jaccard >= threshold. The first common
    band is where ``LSHIndex.candidates`` meets the pair first: it breaks similarity ties as the
    sequential filter does."""
    _, docs = group
    docs = sorted(docs, key=lambda d: d[0])
    for a in range(len(docs)):
        for b in range(a + 1, len(docs)):
            (ka, ra, sa), (kb, rb, sb) = docs[a], docs[b]
            sim = minhash.estimate_jaccard(sa, sb)
            if sim >= threshold:
                band = next(i for i in range(bands) if np.array_equal(sa[i * rows:(i + 1) * rows],
                                                                      sb[i * rows:(i + 1) * rows]))
                yield ka, kb, sim, ra, rb, band


def resolve_near(edges: Sequence[tuple]) -> Iterator[tuple]:
    """The sequential rule over the verified edges: in key order, a document is removed iff an
    earlier neighbour was kept. Yields (removed key, (its id, its kept neighbours [(key, id, sim,
    band)]))."""
    earlier, nbrs, rids = defaultdict(list), defaultdict(list), {}
    for i, j, sim, i_rid, j_rid, band in edges:
        rids[j] = j_rid
        earlier[j].append(i)
        nbrs[i].append((j, j_rid, sim, band))
        nbrs[j].append((i, i_rid, sim, band))
    removed: set = set()
    for j in sorted(earlier):
        if any(i not in removed for i in earlier[j]):
            removed.add(j)
    for r in sorted(removed):
        yield r, (rids[r], [n for n in nbrs[r] if n[0] not in removed])


def best_kept(nbrs: Sequence[tuple], before) -> tuple[str, float]:
    """(id, similarity) of the kept neighbour a document at key ``before`` is matched to
    sequentially: the most similar one before it; ties go to the first LSH candidate (band, key)."""
    key, rid, sim, band = min((n for n in nbrs if n[0] < before), key=lambda n: (-n[2], n[3], n[0]))
    return rid, sim


def _removals(item):
    """A first document's group -> (key, kind, removed id, kept id, similarity) rows for itself
    (when near-removed) and its exact copies: near when the first was removed (a copy of a removed
    document meets the kept documents before it, as sequentially), else exact."""
    rep_key, g = item
    near = list(g["near"])
    for key, rid, first_rid in g["copies"]:
        yield (key, "near", rid, *best_kept(near[0][1], key)) if near else (key, "exact", rid, first_rid, 1.0)
    for rid, nbrs in near:
        yield rep_key, "near", rid, *best_kept(nbrs, rep_key)


def plan_shards(kept_per_file: dict[int, int], n_files: int, shard_size: int) -> list[list[tuple[int, int, int]]]:
    """Output shard j (``shard_size`` kept records, the last one shorter) -> its pieces
    (file, first kept rank, end kept rank), in input order: the in-process ShardWriter's layout."""
    pieces, shards, room = [], [], shard_size
    for fi in range(n_files):
        lo, n = 0, kept_per_file.get(fi, 0)
        while lo < n:
            take = min(room, n - lo)
            pieces.append((fi, lo, lo + take))
            lo, room = lo + take, room - take
            if room == 0:
                shards.append(pieces)
                pieces, room = [], shard_size
    if pieces:
        shards.append(pieces)
    return shards


def _shard_pieces(_, reports: dict, removed_counts: dict, n_files: int, shard_size: int):
    kept = {fi: reports[fi]["n_ok"] - removed_counts.get(fi, 0) for fi in reports}
    for j, pieces in enumerate(plan_shards(kept, n_files, shard_size)):
        for idx, (fi, lo, hi) in enumerate(pieces):
            yield fi, (j, idx, lo, hi)


def _route_pieces(item, files: Sequence[str]):
    fi, g = item
    removed = sorted(g["removed"])
    for j, idx, lo, hi in g["piece"]:
        yield j, (idx, files[fi], lo, hi, removed)


class _WriteDedupShard(beam.DoFn):
    """(shard j, pieces) -> ``dedup-0000j.jsonl``: streams each piece's input file, skipping its
    removed lines, and writes the kept records of ranks [lo, hi)."""

    def __init__(self, reader: Reader, out_dir: str):
        self.reader, self.out_dir = reader, out_dir

    def process(self, item):
        j, pieces = item
        name = stage.shard_name("dedup", j)
        with FileSystems.create(_join(self.out_dir, name), compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for _, path, lo, hi, removed in sorted(pieces):
                removed, rank = set(removed), 0
                for line, rec in self.reader(path, records.ReadReport()):
                    if line in removed:
                        continue
                    if rank >= lo:
                        f.write((_kept_line(rec) + "\n").encode("utf-8"))
                    rank += 1
                    if rank >= hi:
                        break
        yield name


def _dedup_pipeline(files: list[str], cfg: dedup.DedupConfig):
    reader = Reader("records", (cfg.text_field,), strict=False)
    names = [_basename(f) for f in files]
    bands, rows = minhash.optimal_bands(cfg.threshold, cfg.num_perm) if cfg.near else (None, None)

    def build(p, tmp):
        files_pc, docs, reports = _read(p, files, reader)
        firsts = (docs | "Sign" >> beam.ParDo(_Sign(cfg, names)) | "ByHash" >> beam.GroupByKey()
                  | "Exact" >> beam.FlatMap(_split_exact).with_outputs("copy", main="first"))
        if cfg.near:
            edges = (firsts.first | "Bands" >> beam.FlatMap(_band_keys, bands, rows)
                     | "ByBand" >> beam.GroupByKey()
                     | "Pairs" >> beam.FlatMap(verified_pairs, cfg.threshold, bands, rows)
                     | "OnePerPair" >> beam.Distinct())
            near = edges | "AllEdges" >> beam.combiners.ToList() | "Resolve" >> beam.FlatMap(resolve_near)
        else:
            near = p | "NoNear" >> beam.Create([])
        removals = ({"near": near, "copies": firsts.copy} | "JoinCopies" >> beam.CoGroupByKey()
                    | "Removals" >> beam.FlatMap(_removals))
        removed_lines = removals | "RemovedLines" >> beam.Map(lambda r: (r[0][0], r[0][1]))
        removed_counts = removed_lines | "PerFile" >> beam.combiners.Count.PerKey()
        report_by_file = beam.pvalue.AsDict(reports)
        pieces = (p | "PlanSeed" >> beam.Create([None])
                  | "Plan" >> beam.FlatMap(_shard_pieces, report_by_file, beam.pvalue.AsDict(removed_counts),
                                           len(files), cfg.shard_size))
        shards = ({"piece": pieces, "removed": removed_lines} | "JoinPieces" >> beam.CoGroupByKey()
                  | "Route" >> beam.FlatMap(_route_pieces, files) | "ByShard" >> beam.GroupByKey()
                  | "WriteShards" >> beam.ParDo(_WriteDedupShard(reader, _join(tmp, stage.SHARDS_DIR))))
        kinds = removals | "Kinds" >> beam.Map(lambda r: r[1]) | "CountKinds" >> beam.combiners.Count.PerElement()
        sample = removals | "Sample" >> beam.combiners.Top.Smallest(dedup.MAX_PAIR_SAMPLES, key=lambda r: r[0])
        _ = (p | "SummarySeed" >> beam.Create([None])
             | "Summary" >> beam.Map(_write_summary, _join(tmp, SUMMARY_FILE),
                                     reports=beam.pvalue.AsList(reports),
                                     kinds=beam.pvalue.AsList(kinds), sample=beam.pvalue.AsSingleton(sample),
                                     shards=beam.pvalue.AsList(shards)))

    return build, bands, rows


def run_dedup(inputs: Sequence[str], out_dir: str | os.PathLike, cfg: dedup.DedupConfig | None = None,
              pipeline_args: Sequence[str] = (), force: bool = False) -> dict:
    """``data_gen.dedup.run`` as a Beam pipeline: the same shards, report and fingerprint."""
    cfg = cfg if cfg is not None else dedup.DedupConfig()
    cfg.validate()
    remote = any(is_remote(s) for s in inputs)
    files = match_remote(inputs) if remote else [str(f) for f in dedup.expand_inputs(inputs)]
    out = str(out_dir)
    fp = fingerprint("dedup", files, {"dedup": dataclasses.asdict(cfg)})
    st = _stage(out, fp, dedup.REPORT_FILE, "dedup")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    tmp = _tmp_dir(out)
    build, bands, rows = _dedup_pipeline(files, cfg)
    t0 = time.time()
    s, runner = _run_pipeline(build, pipeline_args, tmp)
    kinds = dict(s["kinds"])
    sample = [{"kind": kind, "removed": rid, "kept": kept, "similarity": round(float(sim), 4)}
              for _, kind, rid, kept, sim in s["sample"]]
    unreadable = _sum_reports([r for _, r in s["reports"]])
    removed = kinds.get("exact", 0) + kinds.get("near", 0)
    _move_dir(_join(tmp, stage.SHARDS_DIR), _join(out, stage.SHARDS_DIR))
    _delete_tree(tmp)
    result = {"n_in": unreadable["n_ok"], "kept": unreadable["n_ok"] - removed,
              "exact_removed": kinds.get("exact", 0), "near_removed": kinds.get("near", 0),
              "pairs_sample": sample, "inputs": files, "fingerprint": fp, "unreadable": unreadable,
              "shards": sorted(s["shards"]), "options": dict(dataclasses.asdict(cfg), bands=bands, rows=rows),
              "resumed": False, "runner": runner, "seconds": round(time.time() - t0, 2)}
    st.finish(result)
    log.info("beam dedup: %d in, %d kept, %d exact and %d near duplicates removed", result["n_in"],
             result["kept"], result["exact_removed"], result["near_removed"])
    return result


# --- classifier scoring ------------------------------------------------------------------------
class _Score(beam.DoFn):
    """Batches of ((file, line), text) -> (file, (line, P[educational])). The classifier (and a
    model featurizer's jit-compiled programs) is loaded once per worker in ``setup``."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def setup(self):
        self.qc = classifier.QualityClassifier(self.model_dir)

    def process(self, batch):
        scores = self.qc.score([t for _, t in batch])
        for ((fi, line), _), s in zip(batch, scores.tolist()):
            yield fi, (line, s)
        yield beam.pvalue.TaggedOutput("hist", (classifier.histogram_counts(scores),
                                                int(np.sum(scores >= self.qc.threshold))))


def _sum_hist(parts):
    counts, above = np.zeros(classifier.HIST_BINS, np.int64), 0
    for c, a in parts:
        counts += c
        above += a
    return counts, above


def _check_classifier_dir(model_dir: str) -> float:
    """The trained classifier's threshold; a directory that is not one is an error up front."""
    d = Path(model_dir)
    if not (d / classifier.INFO_FILE).is_file() or not (d / classifier.MODEL_FILE).is_file():
        raise classifier.InputError(f"{d}: not a trained classifier (needs {classifier.INFO_FILE} "
                                    f"and {classifier.MODEL_FILE})")
    return float(json.loads((d / classifier.INFO_FILE).read_text())["threshold"])


def run_score(model_dir: str | os.PathLike, inputs: Sequence[str], out_dir: str | os.PathLike, *,
              text_field: str = "text", batch: tuple[int, int] = DEFAULT_BATCH,
              pipeline_args: Sequence[str] = (), force: bool = False) -> dict:
    """``classifier.score_files`` as a Beam pipeline: the same scored files, histogram and
    score_summary.json, plus ``_COMPLETE``. Returns the summary (with ``resumed``)."""
    threshold = _check_classifier_dir(str(model_dir))
    remote = any(is_remote(s) for s in inputs)
    files = match_remote(inputs) if remote else [str(p) for p in classifier.validate_inputs(inputs, text_field)]
    names = [_basename(f) for f in files]
    if len(set(names)) != len(names):
        raise classifier.InputError(f"input file names must be distinct (outputs are named after them): {names}")
    if not 1 <= batch[0] <= batch[1]:
        raise classifier.InputError(f"batch sizes must satisfy 1 <= min <= max, got {batch}")
    model_files = [str(Path(model_dir) / classifier.INFO_FILE), str(Path(model_dir) / classifier.MODEL_FILE)]
    out = str(out_dir)
    fp = fingerprint("score", [*files, *model_files], {"text_field": text_field})
    st = _stage(out, fp, "score_summary.json", "score")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    tmp = _tmp_dir(out)
    reader = Reader("classifier", (text_field,), strict=True)

    def build(p, tmp):
        files_pc, docs, _ = _read(p, files, reader)
        scored = (docs | "Texts" >> beam.Map(lambda kv: (kv[0], kv[1][text_field]))
                  | "Batch" >> beam.BatchElements(min_batch_size=batch[0], max_batch_size=batch[1])
                  | "Score" >> beam.ParDo(_Score(str(model_dir))).with_outputs("hist", main="scores"))
        written = _rewrite(files_pc, scored.scores, reader, _join(tmp, "files"), names, "annotate")
        hist = scored.hist | "Histogram" >> beam.CombineGlobally(_sum_hist)
        _ = (p | "SummarySeed" >> beam.Create([None])
             | "Summary" >> beam.Map(_write_summary, _join(tmp, SUMMARY_FILE), hist=beam.pvalue.AsSingleton(hist),
                                     written=beam.pvalue.AsList(written)))

    s, runner = _run_pipeline(build, pipeline_args, tmp)
    counts, above = np.asarray(s["hist"][0], np.int64), int(s["hist"][1])
    for name in names:
        _move(_join(tmp, "files", name), _join(out, name))
    _write_bytes(_join(out, "score_histogram.png"), classifier.histogram_png_bytes(counts, threshold))
    _delete_tree(tmp)
    summary = {"documents": int(counts.sum()), "above_threshold": above, "threshold": threshold,
               "model": str(Path(model_dir).resolve())}
    st.finish(summary)  # byte-equal to score_files' summary
    log.info("beam score (%s): %d docs, %d >= %.3f", runner, summary["documents"], above, threshold)
    return dict(summary, resumed=False)


# --- decontamination -----------------------------------------------------------------------------
class _Decontam(beam.DoFn):
    """Batches of ((file, line), text) -> per-batch ``ReportCounts`` (main), flagged pairs and
    removed (file, line). One ``Decontaminator`` (benchmark index + embedding) per worker,
    built in ``setup``; its embedding runs once per batch."""

    def __init__(self, kwargs: dict, files: Sequence[str]):
        self.kwargs, self.files = kwargs, list(files)

    def setup(self):
        kw = dict(self.kwargs)
        embed = D.make_embed(kw.pop("embed"))
        self.dec = D.build_decontaminator(**kw, embed=embed)

    def process(self, batch):
        dec = self.dec
        counts = D.ReportCounts(dec.taus)
        for ((fi, line), _), (pairs, why) in zip(batch, dec.score_docs([t for _, t in batch])):
            rm = dec.removes(pairs)
            counts.add(self.files[fi], pairs, rm, dec.items, why)
            for k, ps in enumerate(pairs):
                row = D.flagged_row(self.files[fi], line, dec.items[ps.item], ps, rm)
                yield beam.pvalue.TaggedOutput("flagged", ((fi, line, k), json.dumps(row)))
            if rm:
                yield beam.pvalue.TaggedOutput("removed", (fi, (line, True)))
        yield counts


class _MergeCounts(beam.CombineFn):
    def __init__(self, taus: Sequence[float]):
        self.taus = list(taus)

    def create_accumulator(self):
        return D.ReportCounts(self.taus)

    def add_input(self, acc, counts):
        return acc.merge(counts)

    def merge_accumulators(self, accs):
        accs = iter(accs)
        first = next(accs)
        for a in accs:
            first.merge(a)
        return first

    def extract_output(self, acc):
        return acc


def _write_flagged(_, path: str, rows: list) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for _, row in sorted(rows):
            f.write((row + "\n").encode("utf-8"))


def _counts_summary(_, path: str, counts: D.ReportCounts, files: Sequence[str], written: list,
                    reports: list) -> None:
    counts = D.ReportCounts(counts.taus).merge(counts)  # a copy: a side input may be reused on a retry
    for fi, rep in reports:
        counts.add_read(files[fi], rep["skipped"])
    _write_summary(None, path, fields=counts.fields(list(files)), written=written)


def run_decontaminate(inputs: Sequence[str], text_field: str, out_dir: str | os.PathLike, *,
                      taus: Sequence[float] = D.DEFAULT_TAUS, ngram: int = D.DEFAULT_NGRAM, remove_tau: float = 0.9,
                      remove_min_ngrams: int = 1, mbpp_split: str | None = "all", humaneval: bool = True,
                      extra_bench: Sequence[str] = (), min_ast_nodes: int = 1, embed: str | dict = D.DEFAULT_EMBED,
                      batch: tuple[int, int] = DEFAULT_BATCH, pipeline_args: Sequence[str] = (),
                      force: bool = False, strict: bool = False) -> dict:
    """``decontaminate.run`` as a Beam pipeline: the same clean shards, flagged.jsonl and
    report.json/.md fields, plus ``_COMPLETE``. ``embed``: ``hashed_bow``, ``model:PATH`` or
    ``decontaminate.embed_settings``' dict (it must be picklable: workers build their own).
    Unreadable lines are skipped and counted; ``strict``: an error (local inputs: before any work)."""
    fields = D.text_fields(text_field)
    settings = D.embed_settings(embed) if isinstance(embed, str) else dict(embed)
    taus = D.check_options(taus, remove_tau, remove_min_ngrams, ngram)
    if not 1 <= batch[0] <= batch[1]:
        raise D.DecontamError(f"batch sizes must satisfy 1 <= min <= max, got {batch}")
    remote = any(is_remote(s) for s in inputs)
    files = match_remote(inputs) if remote else [str(p) for p in D.validate_inputs(inputs, fields, strict)]
    names = [D._shard_name(Path(_basename(f))) for f in files]
    if len(set(names)) != len(names):
        raise D.DecontamError(f"inputs would write the same clean shard names: {names}")
    items = D.load_bench_items(humaneval, mbpp_split, extra_bench)  # bad extra files: an error now
    if not items:
        raise D.DecontamError("no benchmark items selected")
    kwargs = dict(taus=taus, ngram=ngram, remove_tau=remove_tau, remove_min_ngrams=remove_min_ngrams,
                  mbpp_split=mbpp_split, humaneval=humaneval, extra_bench=[str(e) for e in extra_bench],
                  min_ast_nodes=min_ast_nodes, embed=settings)
    model_files = [str(p) for p in sorted(Path(settings["path"]).rglob("*")) if p.is_file()] \
        if settings.get("kind") == "model" else []
    out = str(out_dir)
    fp = fingerprint("decontaminate", [*files, *map(str, extra_bench), *model_files],
                     {"text_field": text_field, "strict": strict, **kwargs})
    st = _stage(out, fp, "report.json", "decontaminate")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    tmp = _tmp_dir(out)
    reader = Reader("records", fields, strict=strict)
    t0 = time.time()

    def build(p, tmp):
        files_pc, docs, reports = _read(p, files, reader)
        res = (docs | "Texts" >> beam.Map(lambda kv: (kv[0], D.join_fields(kv[1], fields)))
               | "Batch" >> beam.BatchElements(min_batch_size=batch[0], max_batch_size=batch[1])
               | "Decontaminate" >> beam.ParDo(_Decontam(kwargs, files)).with_outputs(
                   "flagged", "removed", main="counts"))
        written = _rewrite(files_pc, res.removed, reader, _join(tmp, "clean"), names, "drop")
        _ = (p | "FlaggedSeed" >> beam.Create([None])
             | "Flagged" >> beam.Map(_write_flagged, _join(tmp, "flagged.jsonl"),
                                     beam.pvalue.AsList(res.flagged)))
        counts = res.counts | "Counts" >> beam.CombineGlobally(_MergeCounts(taus))
        _ = (p | "SummarySeed" >> beam.Create([None])
             | "Summary" >> beam.Map(_counts_summary, _join(tmp, SUMMARY_FILE), beam.pvalue.AsSingleton(counts),
                                     files, beam.pvalue.AsList(written), beam.pvalue.AsList(reports)))

    s, runner = _run_pipeline(build, pipeline_args, tmp)
    for name in names:
        _move(_join(tmp, "clean", name), _join(out, "clean", name))
    _move(_join(tmp, "flagged.jsonl"), _join(out, "flagged.jsonl"))
    _delete_tree(tmp)
    report = D.build_report(files, text_field, dict(Counter(it.benchmark for it in items)), mbpp_split,
                            ngram=ngram, taus=taus, remove_tau=remove_tau, remove_min_ngrams=remove_min_ngrams,
                            min_ast_nodes=min_ast_nodes, embedding=D.embed_label(settings),
                            counts_fields=s["fields"], seconds=time.time() - t0, strict=strict)
    report.update(fingerprint=fp, runner=runner, resumed=False)
    _write_bytes(_join(out, "report.md"), D.render_markdown(report).encode())
    st.finish(report)
    log.info("beam decontaminate (%s): %d docs, %d removed", runner, report["docs"], report["removed"])
    return report


# --- CLI -------------------------------------------------------------------------------------------
def _batch_flag(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(",")
    return int(lo), int(hi or lo)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0] + " Flags after -- go to Beam.")
    sub = ap.add_subparsers(dest="stage", required=True)

    def common(sp):
        sp.add_argument("--runner", default=None, help="Beam runner (default DirectRunner); or pass --runner after --")
        sp.add_argument("--force", action="store_true", help="rerun even if the output is complete")

    d = sub.add_parser("dedup", help="exact + MinHash-LSH dedup (data_gen.dedup)")
    d.add_argument("--inputs", nargs="+", required=True)
    d.add_argument("--out_dir", required=True)
    for name, typ in (("threshold", float), ("num_perm", int), ("ngram", int), ("seed", int),
                      ("text_field", str), ("shard_size", int)):
        d.add_argument(f"--{name}", type=typ)
    d.add_argument("--exact_only", action="store_true")
    ingest.add_gin_flags(d)
    common(d)
    s = sub.add_parser("score", help="add quality_score with a trained classifier (classifier score)")
    s.add_argument("--classifier", "--model", dest="model", required=True,
                   help="a trained classifier dir (python -m data_gen.classifier train)")
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--out_dir", required=True)
    s.add_argument("--text_field", default="text")
    s.add_argument("--batch", type=_batch_flag, default=DEFAULT_BATCH, help="BatchElements MIN,MAX documents")
    common(s)
    c = sub.add_parser("decontaminate", help="decontamination against HumanEval/MBPP (data_gen.decontaminate)")
    D.add_arguments(c)
    c.add_argument("--batch", type=_batch_flag, default=DEFAULT_BATCH, help="BatchElements MIN,MAX documents")
    common(c)
    args = ap.parse_args(argv)
    if args.runner:
        beam_args = [f"--runner={args.runner}", *beam_args]
    cli.setup_logging()
    try:
        if args.stage == "dedup":
            ingest.parse_gin(args)
            overrides = ingest.flag_overrides(args, ("threshold", "num_perm", "ngram", "seed", "text_field",
                                                     "shard_size"))
            if args.exact_only:
                overrides["near"] = False
            cfg = dataclasses.replace(dedup.DedupConfig(), **overrides)
            r = run_dedup(args.inputs, args.out_dir, cfg, beam_args, args.force)
            print(json.dumps({k: r[k] for k in ("n_in", "kept", "exact_removed", "near_removed", "resumed")}))
        elif args.stage == "score":
            r = run_score(args.model, args.inputs, args.out_dir, text_field=args.text_field, batch=args.batch,
                          pipeline_args=beam_args, force=args.force)
            print(json.dumps({k: r[k] for k in ("documents", "above_threshold", "threshold", "resumed")}))
        else:
            r = run_decontaminate(args.inputs, args.text_field, args.out_dir, **D.run_kwargs(args), batch=args.batch,
                                  pipeline_args=beam_args, force=args.force)
            print(json.dumps({k: r[k] for k in ("docs", "removed", "kept", "resumed")}))
    except BadInput as e:
        return cli.fail(e, prog=f"beam_stages {args.stage}")
    return cli.EXIT_OK


if __name__ == "__main__":
    from data_gen import beam_stages as _bs  # the importable module: workers unpickle its DoFns from there

    sys.exit(_bs.main())

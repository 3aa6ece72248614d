"""The educational-value classifier of phi-1's code filter: features -> random forest -> score.

phi-1 trained a random forest on a pretrained code model's output embeddings to predict GPT-4's
"educational value" labels, then scored every file. Here:

  * features (one interface, `make_featurizer(settings).featurize(texts) -> [n, dim] float32`):
      - "model": mean-pooled final hidden states (`Phi.hidden_states`, padding masked out) of a
        phijax checkpoint/export/HF dir loaded with `phijax.decode.load_for_inference`, tokenised
        with its tokenizer, truncated to `max_len`; batched and jit-compiled per length bucket.
      - "text": a cheap fallback that needs no model: a hashed token bag plus a few text
        statistics. Named as such in the saved settings; it is not the paper's method.
  * labels: annotator score >= `label_threshold` (the record's "educational_value"; records
    without one get `heuristic_annotator` scores, recorded as annotator "heuristic").
  * sklearn RandomForestClassifier (fixed random_state), a deterministic held-out split by
    content hash, precision/recall/F1 at the probability threshold that maximises held-out F1
    (or a given one); saved as model.joblib + classifier.json (feature settings, metrics).

CLI:
  python -m data_gen.classifier train --inputs a.jsonl b.jsonl --out_dir D [--features text|model:PATH]
  python -m data_gen.classifier score --model D --inputs a.jsonl --out_dir OUT
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data_gen import heuristic_annotator, stage
from phijax.util import cli
from phijax.util.files import atomic_write_bytes

__all__ = ["DEFAULT_TEXT_SETTINGS", "make_featurizer", "parse_features", "TextFeaturizer", "ModelFeaturizer",
           "train", "QualityClassifier", "read_records", "labels_from_records", "iter_scored", "histogram_counts",
           "histogram_png", "histogram_png_bytes", "main"]

MODEL_FILE = "model.joblib"
INFO_FILE = "classifier.json"
DEFAULT_TEXT_SETTINGS = {"kind": "text", "n_hash": 1024}
DEFAULT_MODEL_SETTINGS = {"kind": "model", "max_len": 512, "batch_size": 16, "min_bucket": 32}


class InputError(ValueError):
    """Bad user input (the CLI exits 2 with its message)."""


# ------------------------------------------------------------------------------------ features
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def _stable_hash(s: str) -> int:
    # Python's hash() is salted per process; features must be identical across runs.
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=1 << 18)
def _token_hash(token: str) -> int:
    return _stable_hash(token)


class TextFeaturizer:
    """Cheap text-feature FALLBACK (no model): L1-normalised hashed token bag + 6 text statistics."""

    N_STATS = 6

    def __init__(self, settings: dict[str, Any]):
        self.settings = dict(settings)
        self.n_hash = int(self.settings["n_hash"])
        if self.n_hash < 1:
            raise InputError(f"n_hash must be >= 1, got {self.n_hash}")

    @property
    def dim(self) -> int:
        return self.n_hash + self.N_STATS

    def _one(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        toks = _TOKEN.findall(text)
        if toks:
            idx = np.fromiter((_token_hash(t) % self.n_hash for t in toks), np.int64, len(toks))
            v[: self.n_hash] = np.bincount(idx, minlength=self.n_hash) / len(toks)
        lines = text.splitlines() or [""]
        nonblank = [l for l in lines if l.strip()] or [""]
        n = max(len(text), 1)
        v[self.n_hash:] = (
            math.log1p(len(text)),
            math.log1p(len(lines)),
            float(np.mean([len(l) for l in lines])) / 80.0,
            sum(l.lstrip().startswith("#") for l in nonblank) / len(nonblank),
            sum(c.isdigit() for c in text) / n,
            sum(c.isspace() for c in text) / n,
        )
        return v

    def featurize(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._one(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


@functools.cache
def _mean_pooled_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    # graphdef static: every featurizer of the same architecture shares the compiled programs.
    @functools.partial(jax.jit, static_argnums=0)
    def mean_pooled(graphdef, params, tokens, mask):
        h = nnx.merge(graphdef, params).hidden_states(tokens, segment_ids=mask.astype(jnp.int32))
        m = mask[..., None].astype(jnp.float32)
        return (h.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)

    return mean_pooled


def _mean_pooled(graphdef, params, tokens, mask):
    """[batch, d_model] mean of the final hidden states over the positions where `mask` is True."""
    return _mean_pooled_fn()(graphdef, params, tokens, mask)


class ModelFeaturizer:
    """Mean-pooled final hidden states of a phijax model (the paper's "embeddings" features).

    Rows are right-padded to a power-of-two length bucket (>= min_bucket, <= max_len) with
    segment id 0 for padding and 1 for tokens. Attention is causal, so real tokens never see the
    padding after them, and the mean runs over real tokens only: a text's embedding does not
    depend on the other texts in its batch. Batches are padded with empty rows to `batch_size`,
    so one program is compiled per length bucket.
    """

    def __init__(self, settings: dict[str, Any]):
        import jax

        from phijax import decode

        self.settings = {**DEFAULT_MODEL_SETTINGS, **settings}
        path = self.settings.get("path")
        if not path or not Path(path).is_dir():
            raise InputError(f"model features: {path!r} is not a model directory")
        self.model = decode.load_for_inference(str(path))
        if self.model.tokenizer is None:
            raise InputError(f"model features: {path} has no tokenizer.json (export with tokenizer_path=...)")
        cfg = self.model.cfg
        self.max_len = int(self.settings["max_len"])
        self.batch_size = int(self.settings["batch_size"])
        self.min_bucket = int(self.settings["min_bucket"])
        if not 1 <= self.max_len <= cfg.max_len:
            raise InputError(f"max_len must be in [1, {cfg.max_len}] (the model's max_len), got {self.max_len}")
        if self.batch_size < 1 or self.min_bucket < 1:
            raise InputError("batch_size and min_bucket must be >= 1")
        self.dim = cfg.d_model
        self.settings["d_model"] = cfg.d_model
        self._params = jax.device_put(self.model.params)

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, 1 << (max(n, 1) - 1).bit_length()))

    def featurize(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        ids = [x[: self.max_len] for x in self.model.tokenizer.encode_batch(list(texts))]
        # Sorted by length so each batch uses the smallest bucket that fits it.
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            t = self._bucket(max(len(ids[i]) for i in rows))
            tokens = np.zeros((self.batch_size, t), np.int32)
            mask = np.zeros((self.batch_size, t), np.bool_)
            for r, i in enumerate(rows):
                tokens[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = True
            out[rows] = np.asarray(_mean_pooled(self.model.graphdef, self._params, tokens, mask))[: len(rows)]
        return out


def parse_features(spec: str, **model_settings) -> dict[str, Any]:
    """'text' or 'model:PATH' -> a settings dict."""
    if spec == "text":
        return dict(DEFAULT_TEXT_SETTINGS)
    if spec.startswith("model:") and spec[len("model:"):]:
        path = spec[len("model:"):]
        if not Path(path).is_dir():
            raise InputError(f"--features {spec}: {path} is not a model directory")
        return {**DEFAULT_MODEL_SETTINGS, **{k: v for k, v in model_settings.items() if v is not None},
                "path": str(Path(path).resolve())}
    raise InputError(f"--features must be 'text' or 'model:PATH', got {spec!r}")


def make_featurizer(settings: dict[str, Any]):
    kind = settings.get("kind")
    if kind == "text":
        return TextFeaturizer(settings)
    if kind == "model":
        return ModelFeaturizer(settings)
    raise InputError(f"unknown feature kind {kind!r} (expected 'text' or 'model')")


# ------------------------------------------------------------------------------------ inputs
def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, json.loads(line)


def validate_inputs(paths: Sequence[str], text_field: str) -> list[Path]:
    """Checks every input exists and every line is a JSON object with a string `text_field`."""
    if not paths:
        raise InputError("no --inputs given")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"{p}: no such input file")
        count = 0
        try:
            for n, rec in _iter_jsonl(p):
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise InputError(f"{p}:{n}: expected a JSON object with a string {text_field!r} field")
                count += 1
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: not valid JSONL ({e})") from None
        if count == 0:
            raise InputError(f"{p}: no records")
        out.append(p)
    return out


def read_records(paths: Iterable[Path]) -> list[dict]:
    return [rec for p in paths for _, rec in _iter_jsonl(Path(p))]


# ------------------------------------------------------------------------------------ training
def _held_out_mask(texts: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    # Content hash, not position: a document lands in the same split whatever the input order.
    return np.array([(_stable_hash(f"{seed}:{t}") % 10_000) < fraction * 10_000 for t in texts])


def _prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "accuracy": float(np.mean(pred == y))}


def best_threshold(y: np.ndarray, proba: np.ndarray) -> float:
    """The probability threshold (predict positive when proba >= t) with the highest F1 on (y, proba);
    ties go to the highest threshold (the stricter filter)."""
    best, best_f1 = 0.5, -1.0
    for t in sorted(set(proba.tolist()), reverse=True):
        f1 = _prf(y, proba >= t)["f1"]
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def train(texts: Sequence[str], scores: Sequence[float], settings: dict[str, Any], out_dir: str | Path, *,
          annotator: str, label_threshold: float = 0.7, threshold: float | None = None,
          test_fraction: float = 0.25, seed: int = 0, n_estimators: int = 200) -> dict[str, Any]:
    """Trains, evaluates on the held-out split, saves to `out_dir`; returns classifier.json's content."""
    import joblib
    import sklearn
    from sklearn.ensemble import RandomForestClassifier

    if len(texts) != len(scores):
        raise InputError(f"{len(texts)} texts but {len(scores)} scores")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n_estimators < 1:
        raise InputError(f"n_estimators must be >= 1, got {n_estimators}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}")
    y = np.asarray(scores, np.float64) >= label_threshold
    test = _held_out_mask(texts, test_fraction, seed)
    for name, part in (("training", ~test), ("held-out", test)):
        if len(set(y[part].tolist())) < 2:
            raise InputError(f"the {name} split ({int(part.sum())} docs) needs both classes at "
                             f"label_threshold={label_threshold}; positives overall: {int(y.sum())}/{len(y)}")
    featurizer = make_featurizer(settings)
    t0 = time.perf_counter()
    x = featurizer.featurize(list(texts))
    feat_s = time.perf_counter() - t0
    clf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1,
                                 class_weight="balanced", min_samples_leaf=2)
    clf.fit(x[~test], y[~test])
    proba = clf.predict_proba(x[test])[:, 1]
    chosen = best_threshold(y[test], proba) if threshold is None else float(threshold)
    yt = y[test]
    majority = bool(np.mean(y[~test]) >= 0.5)
    metrics = {
        **_prf(yt, proba >= chosen),
        "threshold": chosen,
        "threshold_source": "max held-out F1" if threshold is None else "given",
        "n_train": int((~test).sum()), "n_held_out": int(test.sum()),
        "held_out_positive_rate": float(yt.mean()),
        # Baselines the classifier has to beat: the majority class, and "keep everything".
        "majority_class_accuracy": float(np.mean(yt == majority)),
        "all_positive_f1": _prf(yt, np.ones_like(yt))["f1"],
        "featurize_docs_per_s": len(texts) / feat_s if feat_s > 0 else float("inf"),
    }
    info = {"features": featurizer.settings, "feature_dim": int(x.shape[1]), "annotator": annotator,
            "label_threshold": label_threshold, "threshold": chosen, "test_fraction": test_fraction,
            "seed": seed, "n_estimators": n_estimators, "sklearn_version": sklearn.__version__,
            "metrics": metrics}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(clf, out / MODEL_FILE)
    atomic_write_bytes(out / INFO_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info


class QualityClassifier:
    """A trained classifier directory: `score(texts)` -> P(educational) per text; `threshold`."""

    def __init__(self, model_dir: str | Path):
        import joblib

        d = Path(model_dir)
        if not (d / INFO_FILE).is_file() or not (d / MODEL_FILE).is_file():
            raise InputError(f"{d}: not a trained classifier (needs {INFO_FILE} and {MODEL_FILE})")
        self.info = json.loads((d / INFO_FILE).read_text())
        self.threshold = float(self.info["threshold"])
        self.featurizer = make_featurizer(self.info["features"])
        self.clf = joblib.load(d / MODEL_FILE)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float64)
        return self.clf.predict_proba(self.featurizer.featurize(list(texts)))[:, 1]


HIST_BINS = 40


def iter_scored(qc: QualityClassifier, recs: Iterable[dict], *, text_field: str = "text",
                chunk: int = 1024) -> Iterator[tuple[list[dict], list[float]]]:
    """(records, their float scores) in chunks of ``chunk``: a stream is scored holding one chunk.
    A row's score does not depend on its chunk-mates (the forest scores rows independently)."""
    buf: list[dict] = []
    for rec in recs:
        buf.append(rec)
        if len(buf) >= chunk:
            yield buf, qc.score([r[text_field] for r in buf]).tolist()
            buf = []
    if buf:
        yield buf, qc.score([r[text_field] for r in buf]).tolist()


def histogram_counts(scores: Sequence[float]) -> np.ndarray:
    """Counts over HIST_BINS equal bins of [0, 1]; sums of these are the histogram of a stream."""
    return np.histogram(np.asarray(scores, np.float64), bins=HIST_BINS, range=(0.0, 1.0))[0]


def histogram_png_bytes(counts: np.ndarray, threshold: float) -> bytes:
    """The score histogram (``histogram_counts``' bins) as a PNG, the threshold marked."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stairs(counts, np.linspace(0.0, 1.0, len(counts) + 1), fill=True, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("quality_score (P[educational])")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def histogram_png(counts: np.ndarray, threshold: float, path: Path) -> None:
    atomic_write_bytes(path, histogram_png_bytes(counts, threshold))


def score_files(model_dir: str | Path, inputs: Sequence[Path], out_dir: str | Path, *, text_field: str = "text",
                chunk: int = 1024) -> dict[str, Any]:
    """Writes OUT/<input name> with "quality_score" added to each record (streamed in chunks),
    OUT/score_histogram.png and OUT/score_summary.json."""
    qc = QualityClassifier(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(p).name for p in inputs]
    if len(set(names)) != len(names):
        raise InputError(f"input file names must be distinct (outputs are named after them): {names}")
    counts = np.zeros(HIST_BINS, np.int64)
    above = 0
    for p in inputs:
        with stage.AtomicFile(out / Path(p).name) as f:
            for recs, scores in iter_scored(qc, (rec for _, rec in _iter_jsonl(Path(p))),
                                            text_field=text_field, chunk=chunk):
                for r, v in zip(recs, scores):
                    f.write(json.dumps({**r, "quality_score": round(v, 6)}, ensure_ascii=False) + "\n")
                counts += histogram_counts(scores)
                above += sum(v >= qc.threshold for v in scores)
    histogram_png(counts, qc.threshold, out / "score_histogram.png")
    summary = {"documents": int(counts.sum()), "above_threshold": int(above),
               "threshold": qc.threshold, "model": str(Path(model_dir).resolve())}
    stage.write_json(out / "score_summary.json", summary)
    return summary


# ------------------------------------------------------------------------------------ CLI
def labels_from_records(records: list[dict], text_field: str, label_field: str) -> tuple[list[float], str]:
    """Annotator scores: the records' own `label_field` if every record has one, else heuristic ones."""
    if all(isinstance(r.get(label_field), (int, float)) for r in records):
        names = sorted({str(r.get("annotator", "unknown")) for r in records})
        return [float(r[label_field]) for r in records], ",".join(names)
    if any(label_field in r for r in records):
        raise InputError(f"some records have {label_field!r} and some do not: annotate all or none")
    # No LLM annotation given: the clearly named heuristic stand-in.
    return [heuristic_annotator.heuristic_score(r[text_field]) for r in records], heuristic_annotator.ANNOTATOR_NAME


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the random forest on annotated JSONL shards")
    t.add_argument("--inputs", nargs="+", required=True)
    t.add_argument("--out_dir", required=True)
    t.add_argument("--features", default="text", help="'text' (cheap fallback) or 'model:PATH'")
    t.add_argument("--text_field", default="text")
    t.add_argument("--label_field", default="educational_value")
    t.add_argument("--label_threshold", type=float, default=0.7)
    t.add_argument("--threshold", type=float, default=None, help="fixed probability threshold (default: max F1)")
    t.add_argument("--test_fraction", type=float, default=0.25)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n_estimators", type=int, default=200)
    t.add_argument("--max_len", type=int, default=None, help="model features: tokens per document")
    t.add_argument("--batch_size", type=int, default=None, help="model features: documents per batch")
    s = sub.add_parser("score", help="add quality_score to every record")
    s.add_argument("--classifier", "--model", dest="model", required=True, help="a trained classifier dir (train)")
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--out_dir", required=True)
    s.add_argument("--text_field", default="text")
    args = ap.parse_args(argv)
    cli.setup_logging()
    try:
        inputs = validate_inputs(args.inputs, args.text_field)
        if args.cmd == "train":
            settings = parse_features(args.features, max_len=args.max_len, batch_size=args.batch_size)
            records = read_records(inputs)
            scores, annotator = labels_from_records(records, args.text_field, args.label_field)
            info = train([r[args.text_field] for r in records], scores, settings, args.out_dir,
                         annotator=annotator, label_threshold=args.label_threshold, threshold=args.threshold,
                         test_fraction=args.test_fraction, seed=args.seed, n_estimators=args.n_estimators)
            m = info["metrics"]
            print(f"held-out ({m['n_held_out']} docs, annotator={annotator}): precision={m['precision']:.3f} "
                  f"recall={m['recall']:.3f} f1={m['f1']:.3f} at threshold={m['threshold']:.3f} "
                  f"(all-positive f1={m['all_positive_f1']:.3f}); wrote {args.out_dir}")
        else:
            summary = score_files(args.model, inputs, args.out_dir, text_field=args.text_field)
            print(f"scored {summary['documents']} docs, {summary['above_threshold']} >= threshold "
                  f"{summary['threshold']:.3f}; wrote {args.out_dir}")
    except InputError as e:
        return cli.fail(e)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""What the textbook and exercises generators share: the CLI, data files, per-sample random
choices, the engine run, and the shard / reject writers.

Output directory of a generator run::

    ledger.sqlite, responses.jsonl, batches/   the engine's (see data_gen/llm/ledger.py)
    .lock                                      held by the run using the directory (data_gen/llm/lock.py)
    shards/<name>-00000-of-00003.jsonl        accepted records (replaced as a set on every finalize)
    rejects.jsonl                              rejected samples: key, sample_index, reason, detail, ...
    stats.json                                 counts (engine + validation) of the last run
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import string
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from data_gen import stage
from data_gen.llm import engine as engine_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm import lock as lock_lib
from data_gen.llm.request import Request, messages_from, seed_from_key
from phijax.util import cli, gin_config
from phijax.util.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED  # noqa: F401 (the CLIs' codes)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARDS_DIR = stage.SHARDS_DIR
REJECTS_FILE = "rejects.jsonl"
STATS_FILE = "stats.json"


class GeneratorError(ValueError):
    """Bad configuration or data files; the message names the file or setting."""


# --- data files ---------------------------------------------------------------------
def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given (absolute or relative to the working dir), else relative to the repo."""
    p = Path(path)
    for cand in (p, REPO_ROOT / p):
        if cand.is_file():
            return cand
    raise GeneratorError(f"file not found: {str(path)!r} (looked in {os.getcwd()} and {REPO_ROOT})")


def read_template(path: str | os.PathLike, allowed: Iterable[str]) -> str:
    """A str.format template whose placeholders must all be in ``allowed``."""
    p = resolve_path(path)
    text = p.read_text(encoding="utf-8")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise GeneratorError(f"{p}: not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    unknown = names - set(allowed)
    if unknown:
        raise GeneratorError(f"{p}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return text


def load_lists(path: str | os.PathLike, required: dict[str, type]) -> dict[str, Any]:
    """A JSON object with the ``required`` keys, each a non-empty list / dict of strings."""
    p = resolve_path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GeneratorError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GeneratorError(f"{p}: expected a JSON object")
    for key, typ in required.items():
        v = data.get(key)
        if not isinstance(v, typ) or not v:
            raise GeneratorError(f"{p}: '{key}' must be a non-empty {typ.__name__}")
        items = v.items() if isinstance(v, dict) else [(None, x) for x in v]
        for k, x in items:
            ok = (all(isinstance(s, str) and s.strip() for s in x) and x) if isinstance(x, list) else \
                (isinstance(x, str) and x.strip())
            if not ok:
                raise GeneratorError(f"{p}: '{key}' entry {k or x!r} must be a non-empty string"
                                     + (" list" if k else ""))
    return data


def sample_rng(seed: int, index: int, salt: str) -> random.Random:
    """Per-sample randomness: sample i's choices depend only on (seed, i), so a run with more
    samples extends, and never changes, a smaller one."""
    return random.Random(hashlib.sha256(f"{salt}/{seed}/{index}".encode()).hexdigest())


def chat_request(model: str, index: int, system: str | None, user: str, params: dict[str, Any],
                 meta: dict[str, Any], seed: int, send_seed: bool) -> Request:
    p = dict(params)
    if send_seed:  # servers that honour it (vLLM, OpenAI best-effort) then reproduce the sample
        p["seed"] = seed_from_key(f"{seed}/{index}")
    return Request(model=model, sample_index=index, kind="chat", messages=messages_from(system, user),
                   params={k: v for k, v in p.items() if v is not None}, meta=meta)


@dataclasses.dataclass
class SamplingConfig:
    """Settings both generators share (each subclass is gin-configurable under its own name)."""

    n_samples: int = 1000
    seed: int = 0
    lists_file: str = ""
    system_template_file: str | None = None
    prompt_template_file: str = ""
    max_tokens: int = 1000
    temperature: float | None = 1.0
    top_p: float | None = None
    send_seed: bool = True
    near_dup_threshold: float = 0.8
    minhash_num_perm: int = 128
    minhash_ngram: int = 5
    shard_size: int = 10_000

    def validate(self) -> None:
        if self.n_samples < 1 or self.max_tokens < 1 or self.shard_size < 1:
            raise GeneratorError("n_samples, max_tokens and shard_size must be >= 1")
        if not 0.0 < self.near_dup_threshold < 1.0:
            raise GeneratorError(f"near_dup_threshold must be in (0, 1), got {self.near_dup_threshold}")

    def near_dup_filter(self):
        from data_gen import minhash
        return minhash.NearDupFilter(self.near_dup_threshold, self.minhash_num_perm, self.minhash_ngram,
                                     seed=self.seed)


def build_chat_requests(cfg: SamplingConfig, model: str, fields: Sequence[str],
                        choose: Callable[[int], dict[str, str]]) -> list[Request]:
    """One chat request per sample: ``choose(i)`` fills the templates and becomes the metadata."""
    user_t = read_template(cfg.prompt_template_file, fields)
    sys_t = read_template(cfg.system_template_file, fields) if cfg.system_template_file else None
    params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    out = []
    for i in range(cfg.n_samples):
        ch = choose(i)
        out.append(chat_request(model, i, sys_t.format(**ch).strip() if sys_t else None,
                                user_t.format(**ch).strip(), params, dict(ch, seed=cfg.seed), cfg.seed,
                                cfg.send_seed))
    return out


def config_factory(cls):
    def make(n_samples: int | None):
        cfg = cls()
        if n_samples is not None:
            cfg.n_samples = n_samples
        return cfg
    return make


# --- CLI ----------------------------------------------------------------------------
def parse_cli(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    p = cli.ArgumentParser(description=description, exit_codes=cli.INCOMPLETE_CODES)
    gin_config.add_gin_flags(p)
    p.add_argument("--out_dir", required=True, help="output directory (ledger, responses, shards); rerun to resume")
    p.add_argument("--n_samples", type=int, help="override the config's n_samples")
    p.add_argument("--dry_run", action="store_true", help="estimate tokens and cost; send nothing")
    p.add_argument("--estimate_json", help="with --dry_run: also write the estimate as JSON to this file")
    p.add_argument("--batch", action="store_true", help="use the Batch API (half price, asynchronous)")
    p.add_argument("--finalize_only", action="store_true", help="only rebuild shards from responses.jsonl")
    p.add_argument("--log_level", default="INFO")
    return p.parse_args(argv)


def setup(args: argparse.Namespace, default_gin: str | None = None) -> None:
    """Logging, then gin: args.gin_file, or without one `default_gin` (a path under the repo's gin/)."""
    if not args.gin_file and default_gin:
        args.gin_file = [os.path.join(gin_config.REPO_GIN_DIR, default_gin)]
    cli.setup_logging(args.log_level)  # httpx / openai per-request lines at WARNING: the engine summarises
    try:
        gin_config.parse(args.gin_file, args.gin_param, args.gin_search_path)
    except gin_config.GinError as e:
        raise GeneratorError(str(e)) from None


def engine_config(batch: bool) -> engine_lib.EngineConfig:
    cfg = engine_lib.EngineConfig()
    if batch:
        cfg.use_batch = True
    engine_lib.install_log_redaction(engine_lib.Redactor([engine_lib.api_key_of(cfg)]))
    return cfg


def run_requests(out_dir: Path, cfg: engine_lib.EngineConfig, requests: list[Request],
                 dry_run: bool) -> engine_lib.RunReport | engine_lib.Estimate:
    eng = engine_lib.Engine(out_dir, cfg)
    eng.check_prices({r.model for r in requests})
    if dry_run:
        est = eng.estimate(requests)
        for line in est.lines():
            print(line)
        return est
    return eng.run_sync(requests, total=len(requests))


# --- finalize -----------------------------------------------------------------------
def load_results(out_dir: Path, requests: Sequence[Request]) -> list[tuple[Request, dict[str, Any] | None]]:
    """(request, its answer or None) in sample order, for the requests of this config only."""
    by_key = {r["key"]: r for r in ledger_lib.iter_answers(out_dir / ledger_lib.RESPONSES_FILE)}
    return [(req, by_key.get(req.key)) for req in sorted(requests, key=lambda r: r.sample_index)]


@dataclasses.dataclass
class Finalized:
    shards: list[Path]
    n_accepted: int
    rejects: dict[str, int]
    missing: list[str]  # keys of the requests without an answer, in sample order

    @property
    def n_missing(self) -> int:
        return len(self.missing)


def finalize(out_dir: Path, name: str, requests: Sequence[Request], shard_size: int,
             judge: Callable[[list[tuple[Request, dict[str, Any]]]], tuple[list[dict], list[dict]]],
             run_info: dict[str, Any]) -> Finalized:
    """Runs ``judge`` over the served results (in sample order) -> (accepted, rejects), writes
    shards, rejects.jsonl and stats.json. Deterministic in the set of results."""
    pairs = load_results(out_dir, requests)
    served = [(req, res) for req, res in pairs if res is not None]
    accepted, rejects = judge(served)
    shards = [out_dir / SHARDS_DIR / n for n in stage.write_shards(out_dir, name, accepted, shard_size)]
    stage.write_jsonl(out_dir / REJECTS_FILE, rejects)
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    out = Finalized(shards, len(accepted), dict(sorted(counts.items())),
                    [req.key for req, res in pairs if res is None])
    stats = {"n_requests": len(pairs), "n_served": len(served), "n_missing": out.n_missing,
             "n_accepted": out.n_accepted, "rejects": out.rejects, "shards": [p.name for p in shards],
             **run_info}
    stage.write_json(out_dir / STATS_FILE, stats)
    log.info("%s: %d accepted into %d shard(s), %d rejected %s, %d not generated yet", name, out.n_accepted,
             len(shards), len(rejects), out.rejects, out.n_missing)
    return out


def reject(req: Request, res: dict[str, Any], reason: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"key": req.key, "sample_index": req.sample_index, "reason": reason, "detail": detail[:500],
            "status": res.get("status"), "meta": dict(req.meta), "text": res.get("text"), **extra}


def missing_line(out_dir: Path, n_requests: int, missing: Sequence[str]) -> str:
    """How many requested samples (``missing``: their keys) have no answer, and why (from the ledger)."""
    why = ledger_lib.why_missing(out_dir, missing)
    return (f"incomplete: {len(missing)} of {n_requests} samples have no answer: "
            + ", ".join(f"{n} {reason}" for reason, n in why.most_common()) + "; rerun the same command to continue")


def main_flow(argv, description: str, name: str, build: Callable[[Any, str], list[Request]],
              judge_factory: Callable[[Any], Callable], config_cls: type) -> int:
    """parse → build requests → (dry run | engine run) → finalize. Returns the exit code: 0 every
    requested sample has an answer, 2 bad input (one ``error:`` line), 3 samples missing (how many
    and why), 130 interrupted."""
    args = parse_cli(argv, description)
    out_dir = Path(args.out_dir)
    try:
        setup(args)
        cfg = config_factory(config_cls)(args.n_samples)
        ecfg = engine_config(args.batch)
        requests = build(cfg, ecfg.model)
        if args.dry_run:
            est = run_requests(out_dir, ecfg, requests, dry_run=True)
            if args.estimate_json:  # read by phijax.recipe's --dry_run
                stage.write_json(args.estimate_json, dict(dataclasses.asdict(est), model=ecfg.model,
                                                          max_tokens=cfg.max_tokens))
            return 0
        with lock_lib.hold(out_dir, create=not args.finalize_only):  # finalize_only: the dir must exist
            report = None if args.finalize_only else run_requests(out_dir, ecfg, requests, dry_run=False)
            info = {"engine": report.as_dict() if report is not None else None, "model": ecfg.model}
            fin = finalize(out_dir, name, requests, cfg.shard_size, judge_factory(cfg), info)
            missing = missing_line(out_dir, len(requests), fin.missing) if fin.missing else None
    except (GeneratorError, engine_lib.EngineError) as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        print(f"interrupted: what was generated is kept in {out_dir}; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{name}: {fin.n_accepted} accepted, rejects {fin.rejects}, shards in {out_dir / SHARDS_DIR}")
    if report is not None:
        print(report.summary())
    if missing:
        print(missing)
        return EXIT_INCOMPLETE
    return 0

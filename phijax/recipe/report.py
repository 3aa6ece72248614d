"""The recipe's report: ``report/report.md`` (for a person), ``report.json`` (the same figures) and
PNG plots, read from what the stages left in their directories.

`write(out_dir, manifest)`: the manifest (phijax/recipe/stages.py `run_report`) names the stage
directories and what ran; everything else is read from the directories. report.json's figures
depend only on the stages' outputs, which are deterministic: a run killed
and resumed writes the same report.json as one that was not, but for ``timings``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from data_gen.llm import ledger as ledger_lib
from phijax.recipe import config as config_lib
from phijax.recipe import runner
from phijax.util import files

log = logging.getLogger("phijax.recipe")

REPORT_MD, REPORT_JSON = "report.md", "report.json"
LOSS_PNG, PASS_PNG, FUNNEL_PNG = "loss.png", "finetune_pass_at_1.png", "funnel.png"
# arXiv 2306.11644, greedy pass@1 (HumanEval; MBPP only for phi-1 itself).
PUBLISHED = [("phi-1-base (1.3B, pretrained)", {"humaneval": 0.29}),
             ("phi-1-small (350M, fine-tuned)", {"humaneval": 0.45}),
             ("phi-1 (1.3B, fine-tuned)", {"humaneval": 0.506, "mbpp": 0.555})]


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.is_file() else None


class _Tokens:
    """Token counts with the training tokenizer."""

    def __init__(self, path: str):
        from phijax.data import vocab

        self.tok = vocab.BPETokenizer(path)

    def __call__(self, texts) -> int:
        return sum(len(self.tok.encode(t)) for t in texts)


def gather(m: dict) -> dict:
    """The report's figures, from the manifest's stage directories."""
    tokens = _Tokens(m["tokenizer"])
    dirs = {k: Path(v) for k, v in m["dirs"].items()}
    enabled = m["enabled"]
    out: dict[str, Any] = {k: m[k] for k in ("title", "note", "source", "teacher")}
    out.update(funnel=[], generation={})
    funnel = out["funnel"]
    # quality filter, per stage
    qf = _read_json(dirs["quality_filter"] / "report.json") or {}
    for row in qf.get("stages", []):
        funnel.append({"stage": f"quality_filter/{row['stage']}", "docs_in": row.get("docs_in"),
                       "docs_out": row.get("docs_out"), "tokens_in": row.get("tokens_in"),
                       "tokens_out": row.get("tokens_out")})
    if qf:
        ing = qf.get("ingest", {})
        funnel[0]["rejects"] = ing.get("skipped")
        dd = qf.get("dedup", {})
        if len(funnel) > 1:
            funnel[1]["rejects"] = {"exact duplicate": dd.get("exact_removed"), "near duplicate": dd.get("near_removed")}
        out["quality_filter"] = {k: qf.get(k) for k in ("annotate", "classifier", "filter")}
        out["decontamination"] = {"filtered_code": qf.get("decontaminate", {}).get("filtered_code")}
    # generation
    for name in config_lib.GENERATION_STAGES:
        if not enabled[name]:
            continue
        d = dirs[name]
        stats = _read_json(d / "stats.json") or {}
        field = (lambda r: r["text"]) if name == "textbooks" else (lambda r: r["prompt"] + r["solution"])
        accepted = list(runner.read_jsonl(runner.shard_files(d / "shards")))
        usage = _usage(d)
        eng = stats.get("engine") or {}
        g = {"model": stats.get("model"), "requests": stats.get("n_requests"), "served": stats.get("n_served"),
             "accepted": len(accepted), "yield": len(accepted) / stats["n_requests"] if stats.get("n_requests") else None,
             "rejects": stats.get("rejects", {}), "prompt_tokens": usage[0], "completion_tokens": usage[1],
             "accepted_tokens": tokens(field(r) for r in accepted),
             "cost_usd": eng.get("total_spent_usd", 0.0) if eng else None}
        out["generation"][name] = g
        funnel.append({"stage": name, "docs_in": g["requests"], "docs_out": g["accepted"], "tokens_in": None,
                       "tokens_out": g["accepted_tokens"], "rejects": g["rejects"]})
    if enabled["mined_exercises"]:
        mr = _read_json(dirs["mined_exercises"] / "report.json") or {}
        mined = list(runner.read_jsonl(runner.shard_files(dirs["mined_exercises"] / "shards")))
        out["mined_exercises"] = {k: mr.get(k) for k in ("n_documents", "n_candidates", "kept",
                                                         "kept_with_doctests", "rejects")}
        funnel.append({"stage": "mined_exercises", "docs_in": mr.get("n_documents"), "docs_out": mr.get("kept"),
                       "tokens_in": None, "tokens_out": tokens(r["prompt"] + r["solution"] for r in mined),
                       "rejects": mr.get("rejects")})
    # decontamination of what was generated or mined
    dec = out.setdefault("decontamination", {})
    for name in m["decontaminated"]:
        r = _read_json(dirs["decontaminate"] / name / "report.json") or {}
        dec[name] = {"docs": r.get("docs"), "removed": r.get("removed"), "kept": r.get("kept"),
                     "ast": {t: v.get("docs") for t, v in (r.get("ast") or {}).items()},
                     "ngram_docs": (r.get("ngram_overlap") or {}).get("docs")}
        funnel.append({"stage": f"decontaminate/{name}", "docs_in": r.get("docs"), "docs_out": r.get("kept"),
                       "tokens_in": None, "tokens_out": None, "rejects": {"benchmark look-alike": r.get("removed")}})
    ex = Path(m["exercises_file"])
    recs = list(runner.read_jsonl([ex])) if ex.is_file() else []
    out["exercises"] = {"total": len(recs), "tokens": tokens(r["prompt"] + r["solution"] for r in recs),
                        "by_source": dict(sorted(Counter(_source_kind(r["source"]) for r in recs).items())),
                        "by_file": dict(sorted(Counter(r["source"] for r in recs).items()))}
    # training
    out["training"] = {}
    for name in ("teacher", "pretrain", "finetune"):
        rows = runner.metrics(dirs[name])
        loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if not loss:
            continue
        out["training"][name] = {"steps": loss[-1][0], "first_loss": loss[0][1], "last_loss": loss[-1][1],
                                 "loss": loss}
    ft = runner.metrics(dirs["finetune"])
    key = next((k for r in ft for k in r if k.startswith("eval/") and k.endswith("/pass@1")), None)
    out["finetune_pass_at_1"] = {"metric": key, "by_step": [(r["step"], r[key]) for r in ft if key and key in r]}
    best = _read_json(dirs["finetune"] / "best.json")
    out["finetune_best"] = {k: best.get(k) for k in ("step", "pass@1", "benchmark")} if best else None
    # evaluation
    rows = []
    for e in m["eval_runs"]:
        s = _read_json(Path(e["output_dir"]) / "summary.json")
        if s is None:
            continue
        rows.append({"model": e["label"], "benchmark": e["benchmark"], "kind": e["kind"],
                     "prompt_format": s.get("prompt_format"), "problems": s.get("problems"),
                     "samples_per_problem": s.get("samples_per_problem"),
                     **{k: v for k, v in s.items() if k.startswith("pass@")}})
    out["evaluation"] = rows
    out["pass_at_1"] = {f"{r['model']}/{r['benchmark']}": r.get("pass@1") for r in rows if r["kind"] == "greedy"}
    sl = {}
    for b in m["solution_loss"]:
        before = _read_json(dirs["evaluate"] / f"solution_loss_pretrained_{b}.json")
        after = _read_json(dirs["evaluate"] / f"solution_loss_finetuned_{b}.json")
        if before and after:
            sl[b] = {"pretrained": before["loss"], "finetuned": after["loss"], "tokens": after.get("tokens"),
                     "problems": after.get("problems")}
    out["solution_loss"] = sl
    out["pruned"] = _pruned(m, dirs, out)
    out["timings"] = {name: (runner.read_marker(dirs[name]) or {}).get("seconds")
                      for name in config_lib.STAGES if name != "report" and enabled[name]}
    return out


def _pruned(m: dict, dirs: dict[str, Path], out: dict) -> list[dict]:
    """The pruned-data table: the unpruned baseline (its own run, or the main one), then each τ."""
    if not m["pruned"]:
        return []
    rows = []
    if "unpruned" not in m["pruned"]:
        sl = out["solution_loss"]
        rows.append({"run": "unpruned (the main run)", "tau": None,
                     **{b: out["pass_at_1"].get(f"finetuned/{b}") for b in m["prune_benchmarks"]},
                     **{f"solution_loss_{b}": sl[b]["finetuned"] for b in m["prune_benchmarks"] if b in sl}})
    for label in m["pruned"]:
        r = (runner.read_marker(dirs["pruned"] / label) or {}).get("summary")
        if not r:
            continue
        row = {"run": label.replace("tau_", "τ = "), "tau": r["tau"],
               "pruned": {k: v["pruned"] for k, v in r["data"].items()},
               "kept": {k: v["kept"] for k, v in r["data"].items()}, "final_loss": r["training"]["last_loss"]}
        for b in m["prune_benchmarks"]:
            row[b] = r[b].get("pass@1")
            if f"solution_loss_{b}" in r:
                row[f"solution_loss_{b}"] = r[f"solution_loss_{b}"]
        rows.append(row)
    return rows


def _source_kind(source: str) -> str:
    return "mined" if source.startswith("mined:") else source


def _usage(d: Path) -> tuple[int, int]:
    """Prompt and completion tokens of every answer in the generator's ledger (all runs)."""
    p, c = 0, 0
    path = d / ledger_lib.RESPONSES_FILE
    if path.is_file():
        for r in ledger_lib.iter_answers(path):
            u = r.get("usage") or {}
            p += u.get("prompt_tokens") or 0
            c += u.get("completion_tokens") or 0
    return p, c


# --- rendering ------------------------------------------------------------------------------------
def _n(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _rejects(r) -> str:
    if not r:
        return ""
    return ", ".join(f"{k} {v}" for k, v in sorted(r.items(), key=lambda kv: -(kv[1] or 0)) if v)


def render(r: dict) -> str:
    L = [f"# {r['title']}", ""]
    if r.get("note"):
        L += [r["note"].strip(), ""]
    L += [f"Source: `{r['source']}`; teacher: `{r['teacher']}`.", "",
          "## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    L += [f"| {k} | {_n(v)} |" for k, v in r["timings"].items()]
    L += ["", "## Data funnel", "", f"![funnel]({FUNNEL_PNG})", "",
          "| stage | documents in | documents out | tokens in | tokens out | rejects by reason |",
          "| --- | --- | --- | --- | --- | --- |"]
    L += [f"| {f['stage']} | {_n(f.get('docs_in'))} | {_n(f.get('docs_out'))} | {_n(f.get('tokens_in'))} | "
          f"{_n(f.get('tokens_out'))} | {_rejects(f.get('rejects'))} |" for f in r["funnel"]]
    qf = r.get("quality_filter") or {}
    if qf.get("classifier"):
        c = qf["classifier"]
        L += ["", f"Quality classifier (labels: {qf['annotate'].get('annotator')}): held-out precision "
              f"{_n(c.get('precision'))}, recall {_n(c.get('recall'))}, F1 {_n(c.get('f1'))} at threshold "
              f"{_n(c.get('threshold'))}."]
    if r["generation"]:
        L += ["", "## Synthetic data: yields and cost", "",
              "| stage | teacher | requests | accepted | yield | prompt tokens | completion tokens | accepted tokens | cost |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, g in r["generation"].items():
            L.append(f"| {name} | {g['model']} | {_n(g['requests'])} | {_n(g['accepted'])} | {_pct(g['yield'])} | "
                     f"{_n(g['prompt_tokens'])} | {_n(g['completion_tokens'])} | {_n(g['accepted_tokens'])} | "
                     f"${g['cost_usd'] or 0:.2f} |")
        for name, g in r["generation"].items():
            if g["rejects"]:
                L.append(f"\n{name} rejects: {_rejects(g['rejects'])}.")
    ex = r["exercises"]
    L += ["", "## Fine-tuning exercises", "",
          f"{ex['total']:,} exercises ({_n(ex['tokens'])} tokens) after decontamination, by source: "
          + (", ".join(f"{k}: {v}" for k, v in ex["by_source"].items()) or "none") + "."]
    mined_files = [(k.removeprefix("mined:"), v) for k, v in ex["by_file"].items() if k.startswith("mined:")]
    if mined_files:
        top = sorted(mined_files, key=lambda kv: -kv[1])
        L.append("Mined from: " + ", ".join(f"`{k}` {v}" for k, v in top[:12])
                 + (f" and {len(top) - 12} more files (report.json: exercises.by_file)." if len(top) > 12 else "."))
    if r.get("mined_exercises"):
        m = r["mined_exercises"]
        L.append(f"Mined: {_n(m['kept'])} of {_n(m['n_candidates'])} candidate functions in {_n(m['n_documents'])} "
                 f"documents ({_n(m['kept_with_doctests'])} checked by running their doctests); rejects: "
                 f"{_rejects(m['rejects'])}.")
    L += ["", "## Decontamination", "",
          "Documents flagged per AST-match τ (removed: AST ≥ the remove τ or a shared n-gram).", "",
          "| input | documents | removed | kept | flagged per τ |", "| --- | --- | --- | --- | --- |"]
    for name, d in (r.get("decontamination") or {}).items():
        if not d:
            continue
        ast = d.get("ast") or {}
        taus = ", ".join(f"{t}: {v.get('docs') if isinstance(v, dict) else v}" for t, v in ast.items())
        L.append(f"| {name} | {_n(d.get('docs'))} | {_n(d.get('removed'))} | {_n(d.get('kept'))} | {taus} |")
    L += ["", "## Training", "", f"![loss]({LOSS_PNG})", "", "| run | steps | first loss | last loss |",
          "| --- | --- | --- | --- |"]
    L += [f"| {k} | {v['steps']} | {v['first_loss']:.4f} | {v['last_loss']:.4f} |" for k, v in r["training"].items()]
    fp = r["finetune_pass_at_1"]
    if fp["by_step"]:
        L += ["", f"Pass@1 during fine-tuning ({fp['metric']}): "
              + ", ".join(f"step {s}: {_pct(v)}" for s, v in fp["by_step"]) + f". ![pass@1]({PASS_PNG})"]
    L += ["", "## Evaluation", "", "| model | benchmark | samples | pass@1 | pass@k | problems | prompt format |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in r["evaluation"]:
        ks = ", ".join(f"{k} {_pct(v)}" for k, v in e.items() if k.startswith("pass@") and k != "pass@1")
        L.append(f"| this run, {e['model']} | {e['benchmark']} | {e['kind']} ({e['samples_per_problem']}) | "
                 f"{_pct(e.get('pass@1'))} | {ks or '—'} | {e['problems']} | {e['prompt_format']} |")
    for name, figs in PUBLISHED:
        for b in config_lib.BENCHMARKS:
            if b in figs:
                L.append(f"| {name} (paper) | {b} | greedy | {_pct(figs[b])} | — | "
                         f"{164 if b == 'humaneval' else 500} | |")
    if r.get("pruned"):
        bench = [k for k in config_lib.BENCHMARKS if any(k in row for row in r["pruned"])]
        L += ["", "## Pruned-data experiment (paper §5)", "",
              "Each run retrains on the data less every document decontamination flags at AST match ≥ τ against "
              f"{', '.join(bench)} (documents pruned per input), and is scored on it.", "",
              "| run | documents pruned | " + " | ".join(f"{b} pass@1" for b in bench) + " | "
              + " | ".join(f"{b} held-out loss" for b in bench) + " |",
              "| --- | --- | " + " | ".join("---" for _ in bench) + " | " + " | ".join("---" for _ in bench) + " |"]
        for row in r["pruned"]:
            pr = ", ".join(f"{k} {v}" for k, v in (row.get("pruned") or {}).items()) or "—"
            L.append(f"| {row['run']} | {pr} | " + " | ".join(_pct(row.get(b)) for b in bench) + " | "
                     + " | ".join(_n(row.get(f"solution_loss_{b}")) for b in bench) + " |")
    if r["solution_loss"]:
        L += ["", "## Held-out loss of the canonical solutions", "",
              "Mean loss (nats/token) of each benchmark's canonical solutions given their prompts: it moves "
              "at scales where pass@1 is still zero.", "",
              "| benchmark | problems | solution tokens | pretrained | fine-tuned | change |", "| --- | --- | --- | --- | --- | --- |"]
        for b, s in r["solution_loss"].items():
            L.append(f"| {b} | {_n(s['problems'])} | {_n(s['tokens'])} | {s['pretrained']:.4f} | {s['finetuned']:.4f} | "
                     f"{s['finetuned'] - s['pretrained']:+.4f} |")
    return "\n".join(L) + "\n"


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = [(k, v) for k, v in r["training"].items() if v["loss"]]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.2), squeeze=False)
        for ax, (name, v) in zip(axes[0], runs):
            s, loss = zip(*v["loss"])
            ax.plot(s, loss, marker=".")
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / LOSS_PNG, dpi=100)
        plt.close(fig)
        written.append(LOSS_PNG)
    fp = r["finetune_pass_at_1"]["by_step"]
    if fp:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        s, v = zip(*fp)
        ax.plot(s, [100 * x for x in v], marker="o")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(f"{r['finetune_pass_at_1']['metric']} (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / PASS_PNG, dpi=100)
        plt.close(fig)
        written.append(PASS_PNG)
    rows = [f for f in r["funnel"] if f.get("docs_out") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        names = [f["stage"] for f in rows][::-1]
        ax.barh(names, [f["docs_in"] or 0 for f in rows][::-1], color="#ccc", label="in")
        ax.barh(names, [f["docs_out"] or 0 for f in rows][::-1], color="#4a7", label="out")
        ax.set_xscale("symlog")
        ax.set_xlabel("documents / samples")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / FUNNEL_PNG, dpi=100)
        plt.close(fig)
        written.append(FUNNEL_PNG)
    return written


def write(out: Path, manifest: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    r = gather(manifest)
    plot(r, out)
    files.atomic_write_text(out / REPORT_JSON, json.dumps(r, indent=2, sort_keys=True) + "\n")
    files.atomic_write_text(out / REPORT_MD, render(r))
    log.info("report: %s", out / REPORT_MD)
    return r

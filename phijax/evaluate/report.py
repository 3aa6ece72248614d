"""Evaluation reports: summary.json, a markdown report, and pass@1 against training step.

    report.write(output_dir, summary, results)   # summary.json, report.md (+ evals.jsonl, pass_at_1.png)

Every evaluation written to the same directory is appended to `evals.jsonl`; `report.md` shows
this evaluation (its benchmark and prompt format named in the title, the format described and
the score set beside phi-1's published figure) and the history table, the best pass@1 in bold,
and `pass_at_1.png` plots pass@1 against training step when steps are known.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Mapping, Sequence

from phijax.evaluate import pass_at_k as pak
from phijax.evaluate import problems

HISTORY = "evals.jsonl"
PLOT = "pass_at_1.png"
SUMMARY = "summary.json"
REPORT = "report.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}%"
    return "" if v is None else str(v)


def _ks(summary: Mapping) -> list[str]:
    return sorted((k for k in summary if k.startswith("pass@")), key=lambda k: int(k[5:]))


def summary_table(summary: Mapping) -> str:
    """One evaluation as a two-column markdown table."""
    rows = [("benchmark", summary["benchmark"]), ("prompt format", summary["prompt_format"]),
            ("problems", summary["problems"]), ("samples per problem", summary["samples_per_problem"]),
            ("temperature", summary.get("temperature")), ("top_p", summary.get("top_p")),
            *[(k, _fmt(summary[k])) for k in _ks(summary)],
            ("problems solved (any sample)", summary.get("problems_solved")),
            ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(summary.get("outcomes", {}).items()))),
            ("source", summary.get("source")), ("endpoint API", summary.get("endpoint_api")),
            ("step", summary.get("step")),
            ("sandbox", summary.get("isolation_detail") or summary.get("isolation")),
            ("timeout per program (s)", summary.get("timeout_s"))]
    lines = ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def comparison(summary: Mapping) -> str:
    """Which prompt format this was, and this score beside phi-1's published one."""
    bench, fmt = summary["benchmark"], summary["prompt_format"]
    text = (f"Prompt format `{fmt}`: {problems.FORMAT_DESCRIPTION.get(fmt, fmt)}. "
            f"{problems.comparison_note(bench, fmt)}")
    if "pass@1" in summary:
        full = {"humaneval": 164, "mbpp": 500}  # the sets phi-1's figures are over
        text += f" This evaluation: pass@1 {_fmt(summary['pass@1'])} over {summary['problems']} problems"
        caveats = [c for c, bad in (
            (f"temperature {summary.get('temperature')}", summary.get("temperature") not in (0, None)),
            (f"{summary['samples_per_problem']} samples per problem", summary["samples_per_problem"] != 1),
            ("a subset of the problems", summary["problems"] != full.get(bench, summary["problems"]))) if bad]
        text += f" ({'; '.join(caveats)}: not phi-1's setting)." if caveats else "."
    return text


def history_table(history: Sequence[Mapping]) -> str:
    """Evaluations over training: one row each, the best pass@1 in bold."""
    if not history:
        return ""
    ks = _ks(history[-1])
    best = max(range(len(history)), key=lambda i: history[i].get("pass@1", -1.0)) if "pass@1" in ks else None
    head = ["step", "benchmark", "prompt format", "problems", *ks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, h in enumerate(history):
        cells = [_fmt(h.get("step")), h["benchmark"], h["prompt_format"], _fmt(h["problems"]),
                 *[_fmt(h.get(k)) for k in ks]]
        if i == best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_problem_table(results: Sequence[Mapping]) -> str:
    """task_id, n, c and that problem's pass@1 / first failure."""
    first_fail: dict[str, str] = {}
    for r in results:
        if not r["passed"]:
            first_fail.setdefault(r["task_id"], r["result"])
    lines = ["| task | n | passed | pass@1 | first failure |", "| --- | --- | --- | --- | --- |"]
    for task, (n, c) in pak.counts(results).items():
        why = first_fail.get(task, "").replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {task} | {n} | {c} | {_fmt(pak.estimate(n, c, 1))} | {why} |")
    return "\n".join(lines)


def outcomes(results: Sequence[Mapping]) -> dict[str, int]:
    """Counts of passed / failed / timed out samples."""
    return dict(Counter("passed" if r["passed"] else "timed out" if r["result"] == "timed out" else "failed"
                        for r in results))


def read_history(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_history(history: Sequence[Mapping], path: str) -> str | None:
    """pass@1 against training step (one line per benchmark/prompt format); None without steps."""
    pts = [h for h in history if h.get("step") is not None and "pass@1" in h]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in sorted({(h["benchmark"], h["prompt_format"]) for h in pts}):
        series = sorted((h["step"], 100 * h["pass@1"]) for h in pts if (h["benchmark"], h["prompt_format"]) == key)
        ax.plot([s for s, _ in series], [v for _, v in series], marker="o", label=f"{key[0]} ({key[1]})")
        best = max(series, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.1f}%", best, textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("training step")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def by_library(problems_: Sequence, results: Sequence[Mapping], ks: Sequence[int]) -> dict[str, dict]:
    """library -> {"problems": n, "pass@k": ...} over the results of the problems probing it (libprobe)."""
    lib = {p.task_id: p.library for p in problems_}
    out = {}
    for name in sorted({lib[r["task_id"]] for r in results}):
        rows = [r for r in results if lib[r["task_id"]] == name]
        out[name] = {"problems": len({r["task_id"] for r in rows}), **pak.pass_at_k(rows, ks)}
    return out


def by_library_table(table: Mapping[str, Mapping]) -> str:
    """The per-library breakdown as a markdown table."""
    ks = sorted({k for row in table.values() for k in row if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    lines = ["| library | problems | " + " | ".join(ks) + " |", "| --- | ---: |" + " ---: |" * len(ks)]
    lines += [f"| {name} | {row['problems']} | " + " | ".join(_fmt(row.get(k)) for k in ks) + " |"
              for name, row in table.items()]
    return "\n".join(lines)


def write(output_dir: str, summary: Mapping, results: Sequence[Mapping]) -> dict[str, str]:
    """Write summary.json, append to evals.jsonl, rewrite report.md and the pass@1 plot."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"summary": os.path.join(output_dir, SUMMARY), "report": os.path.join(output_dir, REPORT),
             "history": os.path.join(output_dir, HISTORY)}
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(dict(summary), f, indent=2)
    entry = {k: summary.get(k) for k in ("step", "benchmark", "prompt_format", "problems", "samples_per_problem",
                                         "temperature", "source", *_ks(summary))}
    with open(paths["history"], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    history = read_history(output_dir)
    png = plot_history(history, os.path.join(output_dir, PLOT))
    title = f"# {summary['benchmark']} evaluation (prompt format: {summary['prompt_format']})"
    parts = [title, comparison(summary), summary_table(summary), "## All evaluations in this directory",
             history_table(history)]
    if png:
        parts.append(f"![pass@1 against training step]({PLOT})")
        paths["plot"] = png
    if summary.get("by_library"):
        parts += ["## Per library", by_library_table(summary["by_library"])]
    parts += ["## Per problem", per_problem_table(results)]
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    return paths

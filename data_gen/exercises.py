"""Synthetic "CodeExercises" (phi-1's ≈180M tokens: functions given as signature + docstring,
with solutions), made diverse by constraining the function name and topic.

    python -m data_gen.exercises --gin_file=gin/data/exercises.gin --out_dir=/data/exercises

Sample i draws (function name = verb_noun, topic, difficulty) from the lists file with a
generator seeded by (seed, i) and fills the templates (gin/data/exercises_*.txt). The answer
must hold one ```python block: the function (named as asked, with a docstring and a body)
followed by assert statements that check it. Parsing splits it into

    prompt   = everything up to the end of the docstring (imports, helpers, signature, docstring)
    solution = the function body after the docstring
    tests    = the top-level asserts after the function

and the program prompt + solution + tests is run in the evaluation sandbox
(``phijax.evaluate.sandbox.run_many``); only a run that passes every assert is kept.
Exact duplicates (same code once the function is renamed and docstrings dropped) and MinHash
near-duplicates are removed in sample order. Shards ``shards/exercises-*.jsonl`` hold records
phijax.data.packing reads::

    {"prompt": "def f(x):\\n    \\"\\"\\"...\\"\\"\\"\\n", "solution": "    return x\\n", "tests": "assert ...",
     "entry_point": "f", "id": key, "sample_index": 3, "topic": "...", "difficulty": "...", "model": "..."}

Rejects: not_served_ok:<status>, no_code, syntax_error, missing_function, no_docstring,
empty_solution, no_asserts, tests_failed (with the sandbox status and reason), duplicate,
near_duplicate.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import sys
from typing import Any

import gin

from data_gen import generator
from data_gen.llm.request import Request
from data_gen.text_blocks import python_blocks
# The evaluation sandbox that runs each solution against its own asserts.
from phijax.evaluate import sandbox

TEMPLATE_FIELDS = ("function_name", "topic", "difficulty")


@gin.configurable(module="data_gen")
@dataclasses.dataclass
class ExercisesConfig(generator.SamplingConfig):
    lists_file: str = "gin/data/exercises_topics.json"
    system_template_file: str | None = "gin/data/exercises_system.txt"
    prompt_template_file: str = "gin/data/exercises_prompt.txt"
    max_tokens: int = 700
    min_asserts: int = 1
    sandbox_timeout_s: float = 10.0
    sandbox_workers: int | None = None     # None: one per CPU
    near_dup_threshold: float = 0.85
    shard_size: int = 50_000

    def validate(self) -> None:
        super().validate()
        if self.min_asserts < 1 or not self.sandbox_timeout_s > 0:
            raise generator.GeneratorError("min_asserts must be >= 1 and sandbox_timeout_s > 0")


def choose(cfg: ExercisesConfig, lists: dict[str, Any], index: int) -> dict[str, str]:
    rng = generator.sample_rng(cfg.seed, index, "exercises")
    return {"function_name": f"{rng.choice(lists['name_verbs'])}_{rng.choice(lists['name_nouns'])}",
            "topic": rng.choice(lists["topics"]), "difficulty": rng.choice(lists["difficulties"])}


def build_requests(cfg: ExercisesConfig, model: str) -> list[Request]:
    cfg.validate()
    lists = generator.load_lists(cfg.lists_file, {"name_verbs": list, "name_nouns": list, "topics": list,
                                               "difficulties": list})
    for word in lists["name_verbs"] + lists["name_nouns"]:
        if not word.isidentifier():
            raise generator.GeneratorError(f"{cfg.lists_file}: name part {word!r} is not a Python identifier")
    return generator.build_chat_requests(cfg, model, TEMPLATE_FIELDS, lambda i: choose(cfg, lists, i))


@dataclasses.dataclass
class Exercise:
    prompt: str
    solution: str
    tests: str

    @property
    def program(self) -> str:
        return f"{self.prompt}{self.solution}\n\n{self.tests}\n"


def parse_exercise(text: str, name: str, min_asserts: int = 1) -> Exercise | tuple[str, str]:
    """The exercise, or (reject reason, detail)."""
    blocks = python_blocks(text)
    if not blocks:
        return "no_code", "no ```python block"
    code = next((b for b in blocks if f"def {name}(" in b), blocks[0])
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return "syntax_error", f"line {e.lineno}: {e.msg}"
    idx, fn = next(((i, n) for i, n in enumerate(tree.body)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), (None, None))
    if fn is None:
        found = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        return "missing_function", f"no top-level def {name}(...) (found {found})"
    if ast.get_docstring(fn) is None:
        return "no_docstring", f"{name} has no docstring"
    rest = fn.body[1:]
    if not rest or all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                       for s in rest):
        return "empty_solution", f"{name} has no body after its docstring"
    asserts = [n for n in tree.body[idx + 1:] if isinstance(n, ast.Assert)]
    if len(asserts) < min_asserts:
        return "no_asserts", f"{len(asserts)} top-level assert(s) after {name} < {min_asserts}"
    lines = code.splitlines(keepends=True)
    doc_end = fn.body[0].end_lineno
    prompt = "".join(lines[:doc_end])
    solution = "".join(lines[doc_end:fn.end_lineno])
    tests = "\n".join(ast.get_source_segment(code, a) for a in asserts)
    return Exercise(prompt if prompt.endswith("\n") else prompt + "\n",
                    solution if solution.endswith("\n") else solution + "\n", tests)


def normalized(ex: Exercise, name: str) -> str:
    """The code with the function renamed to ``f`` and docstrings dropped: what duplicates share."""
    tree = ast.parse(ex.prompt + ex.solution)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            node.name = "f"
        elif isinstance(node, ast.Name) and node.id == name:
            node.id = "f"
    return ast.unparse(tree)


def make_judge(cfg: ExercisesConfig):
    def judge(served: list[tuple[Request, dict[str, Any]]]) -> tuple[list[dict], list[dict]]:
        rejects, parsed = [], []
        for req, res in served:
            if res["status"] != "ok":
                rejects.append(generator.reject(req, res, f"not_served_ok:{res['status']}", res.get("error", "")))
                continue
            name = req.meta["function_name"]
            ex = parse_exercise(res["text"], name, cfg.min_asserts)
            if isinstance(ex, tuple):
                rejects.append(generator.reject(req, res, *ex))
            else:
                parsed.append((req, res, ex))
        runs = sandbox.run_many([ex.program for _, _, ex in parsed], workers=cfg.sandbox_workers,
                                timeout_s=cfg.sandbox_timeout_s)
        exact: dict[str, str] = {}
        dedup = cfg.near_dup_filter()
        accepted = []
        for (req, res, ex), run in zip(parsed, runs):
            name = req.meta["function_name"]
            if not run.passed:
                rejects.append(generator.reject(req, res, "tests_failed", f"{run.status}: {run.reason}; "
                                             f"{run.stderr[-300:]}", sandbox_status=run.status))
                continue
            norm = normalized(ex, name)
            digest = hashlib.sha256(norm.encode()).hexdigest()
            if digest in exact:
                rejects.append(generator.reject(req, res, "duplicate", f"of {exact[digest]}", duplicate_of=exact[digest]))
                continue
            dup = dedup.add(req.key, norm)
            if dup:
                rejects.append(generator.reject(req, res, "near_duplicate", f"of {dup[0]} (jaccard~{dup[1]:.2f})",
                                             duplicate_of=dup[0]))
                continue
            exact[digest] = req.key
            accepted.append({"prompt": ex.prompt, "solution": ex.solution, "tests": ex.tests, "entry_point": name,
                             "id": req.key, "sample_index": req.sample_index, **req.meta, "model": req.model})
        rejects.sort(key=lambda r: r["sample_index"])
        return accepted, rejects
    return judge


def main(argv=None) -> int:
    return generator.main_flow(argv, "Generate synthetic CodeExercises (signature + docstring -> solution).",
                            "exercises", build_requests, make_judge, ExercisesConfig)


if __name__ == "__main__":
    sys.exit(main())

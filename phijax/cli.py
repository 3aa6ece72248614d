"""`phijax <command> [flags]`: one command line for everything users run.

Each command is a module with `main(argv) -> int` (exit code, see phijax/util/cli.py), imported
only when that command runs, so `phijax --help` imports no jax or tensorflow. `python -m
<module>` runs the same main. To add a command, add a line to COMMANDS.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import NamedTuple, Sequence

from phijax.util import cli


class Command(NamedTuple):
    module: str  # has main(argv: list[str] | None) -> int
    help: str  # one line for `phijax --help`
    group: str


MODEL, DATA = "model", "data"
COMMANDS: dict[str, Command] = {
    "recipe": Command("phijax.recipe.run", "the phi-1 recipe end to end: raw code -> filtered, synthetic and "
                      "mined data -> pretrain -> fine-tune -> pass@k report (resumable)", MODEL),
    "train": Command("phijax.train", "train (or resume) a phi model from gin configs", MODEL),
    "evaluate": Command("phijax.evaluate.run", "HumanEval / MBPP pass@k of a model or a samples file", MODEL),
    "robustness": Command("phijax.evaluate.robustness", "HumanEval pass@1 under perturbed prompts (typos, "
                          "paraphrases, renamed arguments / function, formatting), ReCode-style", MODEL),
    "solution-loss": Command("phijax.evaluate.solution_loss", "held-out loss (nats/token) of the HumanEval / MBPP "
                             "canonical solutions given their prompts", MODEL),
    "llm-grade": Command("data_gen.llm_grade", "grade an evaluation's completions 0-10 with an LLM (phi-1's rubric; "
                         "OpenAI-compatible endpoint, e.g. phijax serve)", MODEL),
    "serve": Command("phijax.serve.server", "serve a model over an OpenAI-compatible HTTP API (continuous batching)",
                     MODEL),
    "convert": Command("phijax.convert", "Hugging Face Phi directory <-> phijax/orbax parameters", MODEL),
    "compile-check": Command("phijax.compile_check", "compile the train step for a TPU slice on a CPU: memory, "
                             "FLOPs", MODEL),
    "vocab": Command("phijax.data.vocab", "train a byte-level BPE tokenizer.json on Python files", DATA),
    "beam-cache": Command("phijax.data.beam_cache", "build a task's training window cache with Apache Beam", DATA),
    "ingest": Command("data_gen.ingest", "raw code -> normalised, licence-filtered JSONL shards", DATA),
    "dedup": Command("data_gen.dedup", "exact + MinHash-LSH near-duplicate removal", DATA),
    "annotate": Command("data_gen.annotate", "educational-value labels for a sample (LLM or heuristic)", DATA),
    "classifier": Command("data_gen.classifier", "train / apply the quality classifier (random forest)", DATA),
    "filter": Command("data_gen.filter", "keep the documents the quality classifier scores high", DATA),
    "decontaminate": Command("data_gen.decontaminate", "remove HumanEval / MBPP look-alikes (n-gram, AST, "
                             "embedding)", DATA),
    "quality-filter": Command("data_gen.quality_filter", "the whole chain: ingest -> dedup -> annotate -> "
                              "classifier -> filter -> decontaminate", DATA),
    "textbook": Command("data_gen.textbook", "generate synthetic textbook sections (OpenAI-compatible endpoint)",
                        DATA),
    "exercises": Command("data_gen.exercises", "generate synthetic CodeExercises (OpenAI-compatible endpoint)",
                         DATA),
    "mine-exercises": Command("data_gen.mine_exercises", "CodeExercises from documented functions of a code "
                              "corpus (doctests run in the sandbox)", DATA),
    "beam": Command("data_gen.beam_stages", "dedup / score / decontaminate as Apache Beam pipelines", DATA),
}
GROUPS = {MODEL: "model", DATA: "data (phi-1's corpus: code-quality filter, synthetic data)"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: phijax <command> [flags]   (phijax <command> --help: its flags)", "",
             "phi-1 in JAX: train, evaluate, convert, and build the data.", ""]
    for group, title in GROUPS.items():
        lines.append(f"{title}:")
        lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items() if c.group == group]
        lines.append("")
    lines.append("The modules also run directly: python -m phijax.train, python -m phijax.evaluate, "
                 "python -m data_gen.ingest, ...")
    return "\n".join(lines) + "\n\n" + cli.epilog(cli.ALL_CODES)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(usage(), file=sys.stdout if argv else sys.stderr, flush=True)
        except BrokenPipeError:  # `phijax --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return cli.EXIT_OK if argv else cli.EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        return cli.fail(f"unknown command {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + "; `phijax --help` lists the commands", prog="phijax")
    saved = cli.invoked_as, sys.argv[0]
    cli.invoked_as = sys.argv[0] = f"phijax {name}"  # usage lines name the command (argparse's default prog too)
    try:
        cli.setup_logging()  # already for what the module logs while it is imported
        rc = importlib.import_module(command.module).main(rest)
    finally:
        cli.invoked_as, sys.argv[0] = saved
    return cli.EXIT_OK if rc is None else rc

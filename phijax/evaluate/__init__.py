"""Evaluation: HumanEval / MBPP problems and prompts, sandboxed execution, pass@k, reports, the CLI.

    from phijax.evaluate import evaluate_model
    summary = evaluate_model(model_or_sampler, benchmark="humaneval", limit=None)   # summary["pass@1"]

`python -m phijax.evaluate --gin_file=gin/eval/humaneval.gin ...` (see run.py and docs/evaluation.md).
Nothing here imports jax until a model is used.
"""
from phijax.evaluate.run import EvalConfigError, evaluate, evaluate_model

__all__ = ["EvalConfigError", "evaluate", "evaluate_model"]

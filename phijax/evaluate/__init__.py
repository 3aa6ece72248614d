"""Evaluation: HumanEval / MBPP problems and prompts, sandboxed execution, pass@k, reports, the CLI.

    from phijax.evaluate import evaluate_model
    summary = evaluate_model(model_or_sampler, benchmark="humaneval", limit=None)   # summary["pass@1"]

`python -m phijax.evaluate --gin_file=gin/eval/humaneval.gin ...` (see run.py and docs/evaluation.md).
Nothing here imports jax until a model is used.
"""
__all__ = ["EvalConfigError", "evaluate", "evaluate_model"]


def __getattr__(name):
    # Lazy: importing a submodule (problems, sandbox) must not register run.py's gin configurables
    # (gin refuses new ones once a config is parsed) nor need gin at all (accelerator hosts).
    if name in __all__:
        from phijax.evaluate import run
        return getattr(run, name)
    raise AttributeError(f"module 'phijax.evaluate' has no attribute {name!r}")

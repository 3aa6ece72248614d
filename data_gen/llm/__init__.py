"""The LLM generation engine for any OpenAI-compatible endpoint (see docs/data_gen.md).

    from data_gen.llm import Engine, EngineConfig, Request
    report = Engine(out_dir, EngineConfig(model=..., rpm=..., tpm=...)).run_sync(requests)
"""
from data_gen.llm.engine import Engine, EngineConfig, EngineError, Estimate, RunReport  # noqa: F401
from data_gen.llm.ledger import RESPONSES_FILE, iter_answers, iter_results  # noqa: F401
from data_gen.llm.request import Request, messages_from  # noqa: F401
